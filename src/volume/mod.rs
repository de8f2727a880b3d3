//! CT readers into one [`Volume`] type. (Being built: issue 3.)
