//! CLIP prompt tokenisation: OpenAI's BPE (from `instant-clip-tokenizer`, which embeds the
//! same vocabulary), framed as `clip.tokenize(..., truncate=True)` does: start token 49406,
//! at most `context - 2` body tokens, end token 49407, zero padding to `context`.

use instant_clip_tokenizer::{Token, Tokenizer};

/// Tokenises prompts into rows of `context` ids.
pub struct PromptTokenizer {
    inner: Tokenizer,
    context: usize,
}

impl PromptTokenizer {
    /// A tokenizer framing to `context` tokens (77 for CLIP); `context` must be >= 3.
    pub fn new(context: usize) -> Self {
        Self {
            inner: Tokenizer::new(),
            context: context.max(3),
        }
    }

    /// `text` -> `context` ids: start, body (truncated), end, zeros.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut body: Vec<Token> = Vec::new();
        self.inner.encode(text, &mut body);
        let mut ids = Vec::with_capacity(self.context);
        ids.push(u32::from(self.inner.start_of_text().to_u16()));
        ids.extend(
            body.iter()
                .take(self.context - 2)
                .map(|t| u32::from(t.to_u16())),
        );
        ids.push(u32::from(self.inner.end_of_text().to_u16()));
        ids.resize(self.context, 0);
        ids
    }
}
