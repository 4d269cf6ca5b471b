//! A loaded GGUF model ([`Model`]): memory-mapped weights, the vocabulary, tokenizing and
//! detokenizing.

use super::backend::{check_cpu_backend, path_to_cstring, set_verbose};
use super::{GgufInfo, Token};
use anyhow::{bail, ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Layers to offload to the GPU (CUDA or Metal builds); 0 keeps everything on the CPU.
    pub n_gpu_layers: i32,
    /// Memory-map the weights (the default) instead of reading them into memory.
    pub use_mmap: bool,
    /// Lock the weights in RAM so that they are never paged out.
    pub use_mlock: bool,
    /// Let llama.cpp print its own log to stderr.
    pub verbose: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            n_gpu_layers: default_gpu_layers(),
            use_mmap: true,
            use_mlock: false,
            verbose: false,
        }
    }
}

/// All layers on GPU builds, none on CPU builds.
pub fn default_gpu_layers() -> i32 {
    if cfg!(any(feature = "cuda", feature = "metal")) {
        999
    } else {
        0
    }
}

/// A loaded GGUF model and its vocabulary.
pub struct Model {
    pub(super) raw: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    pub info: GgufInfo,
    pub path: PathBuf,
    n_vocab: i32,
}

// SAFETY: a loaded llama_model is read-only: llama.cpp allows any number of contexts on one model,
// used from different threads, and tokenization only reads the vocabulary.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Self> {
        set_verbose(opts.verbose);
        let info = GgufInfo::read(path)?;
        check_cpu_backend()?;
        crate::engine::blas::ensure()?;
        let c_path = path_to_cstring(path)?;
        // SAFETY: default params are a valid struct; the path is a valid C string.
        let raw = unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = opts.n_gpu_layers;
            params.load_mode = match (opts.use_mmap, opts.use_mlock) {
                (true, false) => sys::LLAMA_LOAD_MODE_MMAP,
                (true, true) => sys::LLAMA_LOAD_MODE_MMAP_MLOCK,
                (false, true) => sys::LLAMA_LOAD_MODE_MLOCK,
                (false, false) => sys::LLAMA_LOAD_MODE_NONE,
            };
            sys::llama_model_load_from_file(c_path.as_ptr(), params)
        };
        let raw = NonNull::new(raw).with_context(|| {
            format!(
                "llama.cpp could not load {} (architecture '{}'); run with --verbose to see its log",
                path.display(),
                info.architecture
            )
        })?;
        // SAFETY: valid model pointer.
        let (vocab, n_embd, n_vocab) = unsafe {
            let vocab = sys::llama_model_get_vocab(raw.as_ptr()) as *mut sys::llama_vocab;
            (
                vocab,
                sys::llama_model_n_embd(raw.as_ptr()),
                sys::llama_vocab_n_tokens(vocab),
            )
        };
        let model = Self {
            raw,
            vocab: NonNull::new(vocab).context("model has no vocabulary")?,
            info,
            path: path.to_path_buf(),
            n_vocab,
        };
        ensure!(
            n_embd as usize == model.info.n_embd,
            "model reports n_embd {n_embd} but its GGUF header says {}",
            model.info.n_embd
        );
        Ok(model)
    }

    pub fn n_embd(&self) -> usize {
        self.info.n_embd
    }

    /// Tokenizes text. `add_bos` adds the model's start-of-text token; special-token syntax in
    /// the text is never parsed, so an item title cannot smuggle in control tokens.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).context("text too long to tokenize")?;
        let mut tokens = vec![0 as Token; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: the buffer holds tokens.len() entries; text is passed with its length.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr() as *const c_char,
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_bos,
                    false,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            tokens.resize((-n) as usize, 0);
        }
        bail!("tokenizer failed on a text of {} bytes", text.len())
    }

    /// Text of a token sequence (special tokens are dropped).
    pub fn detokenize(&self, tokens: &[Token]) -> Result<String> {
        self.check_tokens(tokens)?;
        let mut buf = vec![0u8; tokens.len() * 16 + 16];
        for _ in 0..2 {
            // SAFETY: tokens are in range; the buffer length is passed.
            let n = unsafe {
                sys::llama_detokenize(
                    self.vocab.as_ptr(),
                    tokens.as_ptr(),
                    tokens.len() as i32,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    true,
                    false,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize((-n) as usize, 0);
        }
        bail!("detokenizer failed")
    }

    pub(super) fn check_tokens(&self, tokens: &[Token]) -> Result<()> {
        if let Some(t) = tokens.iter().find(|&&t| t < 0 || t >= self.n_vocab) {
            bail!(
                "token id {t} is outside the vocabulary (0..{})",
                self.n_vocab
            );
        }
        Ok(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: freed once; contexts hold an Arc of the model, so none is left.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}
