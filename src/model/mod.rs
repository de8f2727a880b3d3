//! The CLIP nodule model. (Being built: issue 2.)
