//! Tokenizers: a Hugging Face `tokenizer.json` (through the `tokenizers`
//! crate) when the model directory has one, else a byte-level fallback;
//! chat templates; and incremental detokenization for streaming.
//!
//! The byte-level fallback maps ids 0..=255 to those bytes, and any other
//! id to the text `<|id|>` (so that every id a model can produce decodes).
//! The plain chat template, used when the model has none, is
//! `"<|role|>\n{content}\n"` per message, then `"<|assistant|>\n"`.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::model::RuntimeError;

/// The text `moe-init`'s tokenizers are trained on (written for this
/// project).
const CORPUS: &str = include_str!("corpus.txt");

/// Beginning and end of sequence in `moe-init`'s tokenizers.
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// A chat template like Mixtral's, in the tokenizer configuration
/// `moe-init` writes (so the template path is exercised).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '[SYS] ' + message['content'] + ' [/SYS]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

/// Trains a byte-level BPE tokenizer of exactly `vocab` ids on the built-in
/// corpus (merges as far as the corpus allows, then `<|extra_N|>` tokens),
/// writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
pub fn write_tokenizer(dir: &Path, vocab: usize) -> Result<(), RuntimeError> {
    let err = |e: &dyn std::fmt::Display| RuntimeError::Checkpoint {
        file: dir.join("tokenizer.json"),
        detail: e.to_string(),
    };
    if vocab < 258 {
        return Err(err(&format!(
            "a vocabulary of {vocab} has no room for the 256 bytes and {BOS}, {EOS}"
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        tokenizers::NormalizerWrapper,
        ByteLevel,
        ByteLevel,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
    .with_post_processor(Some(ByteLevel::new(false, true, true)))
    .with_decoder(Some(ByteLevel::new(false, true, true)))
    .build()
    .map_err(|e| err(&e))?;
    tok.train(&mut trainer, CORPUS.lines())
        .map_err(|e| err(&e))?;
    let have = tok.get_vocab_size(true);
    let extra: Vec<AddedToken> = (have..vocab)
        .map(|i| AddedToken::from(format!("<|extra_{i}|>"), true))
        .collect();
    let _added = tok.add_special_tokens(extra).map_err(|e| err(&e))?;
    let got = tok.get_vocab_size(true);
    if got != vocab {
        return Err(err(&format!("trained {got} tokens, the model has {vocab}")));
    }
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| err(&e))?;
    let config = serde_json::json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).expect("JSON"),
    )
    .map_err(|e| err(&e))?;
    Ok(())
}

/// A chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's tokenizer and chat template.
#[derive(Debug)]
pub struct Tokenizer {
    hf: Option<tokenizers::Tokenizer>,
    vocab: usize,
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    eos_id: Option<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (and `tokenizer_config.json`) when there,
    /// else the byte-level fallback for a vocabulary of `vocab`.
    pub fn load(dir: &Path, vocab: usize) -> Result<Self, RuntimeError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(Self {
                hf: None,
                vocab,
                template: None,
                bos: None,
                eos: None,
                eos_id: None,
            });
        }
        let hf = tokenizers::Tokenizer::from_file(&path).map_err(|e| RuntimeError::Checkpoint {
            file: path.clone(),
            detail: e.to_string(),
        })?;
        let have = hf.get_vocab_size(true);
        if have > vocab {
            return Err(RuntimeError::Checkpoint {
                file: path,
                detail: format!("{have} tokens, more than the model's vocabulary of {vocab}"),
            });
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| RuntimeError::Checkpoint {
                file: cfg_path.clone(),
                detail: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        // Special tokens are a string or {"content": ...}.
        let special = |k: &str| {
            cfg.get(k).and_then(|v| {
                v.as_str().map(str::to_string).or_else(|| {
                    v.get("content")
                        .and_then(|c| c.as_str())
                        .map(str::to_string)
                })
            })
        };
        let eos = special("eos_token");
        let eos_id = eos.as_deref().and_then(|e| hf.token_to_id(e));
        Ok(Self {
            vocab,
            template: cfg
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            bos: special("bos_token"),
            eos,
            eos_id,
            hf: Some(hf),
        })
    }

    /// Which tokenizer this is, for logs.
    pub fn describe(&self) -> String {
        match &self.hf {
            Some(t) => format!(
                "tokenizer.json ({} tokens{})",
                t.get_vocab_size(true),
                if self.template.is_some() {
                    ", chat template"
                } else {
                    ", plain chat template"
                }
            ),
            None => format!("byte-level fallback (vocabulary {})", self.vocab),
        }
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Token ids of `text` (no special tokens added: templates add them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        match &self.hf {
            Some(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| RuntimeError::Request(format!("cannot tokenize the prompt: {e}"))),
            None => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// The text of `ids`, as one piece (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// [`decode`](Self::decode), leaving out the tokenizer's special
    /// tokens when `skip_special` (the byte-level fallback has none).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> String {
        match &self.hf {
            Some(t) => t.decode(ids, skip_special).unwrap_or_default(),
            None => {
                let mut bytes = Vec::new();
                for &id in ids {
                    if id < 256 {
                        bytes.push(id as u8);
                    } else {
                        bytes.extend_from_slice(format!("<|{id}|>").as_bytes());
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    /// The prompt text of a chat: the model's template, else the plain one.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, RuntimeError> {
        let Some(tpl) = &self.template else {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("<|{}|>\n{}\n", m.role, m.content));
            }
            s.push_str("<|assistant|>\n");
            return Ok(s);
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| RuntimeError::Request(format!("the model's chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => true,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| RuntimeError::Request(format!("chat template: {e}")))
    }
}

/// Incremental detokenization: feed ids one by one, get the text that is
/// final so far. Text is held back while the ids decoded so far end in an
/// incomplete character (U+FFFD at the end) or could still be the start of
/// a stop string; [`finish`](Self::finish) flushes the rest. The streamed
/// pieces concatenate to exactly [`text`](Self::text), which is also what a
/// non-streamed response carries.
#[derive(Debug)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Decoded and final text.
    text: String,
    /// Ids `prefix..read` are decoded into `text` but kept as context;
    /// ids from `read` on are not yet final.
    prefix: usize,
    read: usize,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stops: Vec<String>,
    /// The stop string that ended the text (which is cut there).
    stopped: Option<String>,
    opts: DetokenizeOptions,
    /// Text before this byte is not searched for stop strings (it was
    /// made before `min_tokens` ids were in).
    search_from: usize,
}

/// How a [`Detokenizer`] treats special tokens and stop strings (vLLM's
/// `skip_special_tokens`, `include_stop_str_in_output`, `min_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DetokenizeOptions {
    /// Leave the tokenizer's special tokens out of the text.
    pub skip_special: bool,
    /// Keep a stop string that ends the text in it.
    pub include_stop: bool,
    /// Stop strings count only once this many ids are in.
    pub min_tokens: usize,
}

impl Detokenizer {
    pub fn new(stops: Vec<String>) -> Self {
        Self::with(stops, DetokenizeOptions::default())
    }

    pub fn with(stops: Vec<String>, opts: DetokenizeOptions) -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
            emitted: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: None,
            opts,
            search_from: 0,
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// The stop string that ended the text, if one did.
    pub fn stop_string(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    fn decode(&self, tok: &Tokenizer, ids: &[u32]) -> String {
        tok.decode_with(ids, self.opts.skip_special)
    }

    /// Adds `id`; returns the newly final text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.stopped() {
            return String::new();
        }
        self.ids.push(id);
        let before = self.decode(tok, &self.ids[self.prefix..self.read]);
        let now = self.decode(tok, &self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        self.take(false)
    }

    /// Flushes whatever is held back; returns it.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        if !self.stopped() && self.read < self.ids.len() {
            let before = self.decode(tok, &self.ids[self.prefix..self.read]);
            let now = self.decode(tok, &self.ids[self.prefix..]);
            let tail = now
                .strip_prefix(before.as_str())
                .unwrap_or(&now[before.len().min(now.len())..]);
            self.text.push_str(tail);
            self.read = self.ids.len();
        }
        self.take(true)
    }

    /// The final text so far (after `finish`: all of it).
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    fn take(&mut self, last: bool) -> String {
        // A stop string ends the text before it. Held-back text never
        // contains a whole stop string, so a match starts after `emitted`
        // less a stop's length.
        if self.ids.len() < self.opts.min_tokens {
            self.search_from = self.text.len();
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self
            .emitted
            .saturating_sub(longest)
            .max(self.search_from)
            .min(self.text.len());
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (i + from, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = hit {
            let cut = if self.opts.include_stop {
                at + stop.len()
            } else {
                at
            };
            self.stopped = Some(stop.clone());
            self.text.truncate(cut.max(self.emitted));
        }
        let mut end = self.text.len();
        if !last && !self.stopped() {
            // Hold back a suffix that may grow into a stop string.
            for s in &self.stops {
                for k in (1..s.len()).rev() {
                    if self.text.len() >= k && s.is_char_boundary(k) && self.text.ends_with(&s[..k])
                    {
                        end = end.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained(vocab: usize) -> (tempdir::Dir, Tokenizer) {
        let d = tempdir::Dir::new();
        write_tokenizer(&d.0, vocab).unwrap();
        let t = Tokenizer::load(&d.0, vocab).unwrap();
        (d, t)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "moe-tok-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn trained_tokenizers_have_the_model_vocabulary_and_round_trip() {
        for vocab in [320, 1024] {
            let (_d, t) = trained(vocab);
            let text = "Hello, world! The experts run micro-batches: 3.14 ü 日本";
            let ids = t.encode(text).unwrap();
            assert!(ids.iter().all(|&i| (i as usize) < vocab));
            assert_eq!(t.decode(&ids), text);
            assert!(t.eos_id().is_some());
            // Every id decodes to something.
            for id in 0..vocab as u32 {
                let _ = t.decode(&[id]);
            }
        }
    }

    #[test]
    fn streamed_pieces_concatenate_to_the_text_even_with_split_characters() {
        let (_d, t) = trained(1024);
        // Random ids (as a random model makes) and real text, with and without stops.
        let mut ids: Vec<u32> = t.encode("naïve café — 日本語 ok").unwrap();
        let mut s = 12345u64;
        for _ in 0..200 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ids.push((s % 1024) as u32);
        }
        for stops in [
            vec![],
            vec!["the".to_string()],
            vec!["日本".to_string(), "zz".into()],
        ] {
            let mut d = Detokenizer::new(stops.clone());
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&d.push(&t, id));
                if d.stopped() {
                    break;
                }
            }
            streamed.push_str(&d.finish(&t));
            assert_eq!(streamed, d.text(), "stops {stops:?}");
            for s in &stops {
                assert!(!d.text().contains(s.as_str()), "{s} in {:?}", d.text());
            }
            if stops.is_empty() {
                // Without stops, the text is the whole decode.
                assert_eq!(d.text(), t.decode(&ids));
            }
        }
    }

    #[test]
    fn chat_templates() {
        let (_d, t) = trained(320);
        let msgs = vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ];
        assert_eq!(
            t.apply_chat_template(&msgs).unwrap(),
            "<s>[SYS] Be brief. [/SYS][INST] Hi [/INST]"
        );
        let plain = Tokenizer::load(std::path::Path::new("/nonexistent"), 320).unwrap();
        assert_eq!(
            plain.apply_chat_template(&msgs).unwrap(),
            "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
        );
        assert_eq!(plain.decode(&[72, 105, 300]), "Hi<|300|>");
    }
}
