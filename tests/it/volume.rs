//! Volume readers and the bad-input corpus.
