//! From a volume to the nine planes. (Being built: issue 3.)
