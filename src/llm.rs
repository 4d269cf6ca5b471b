//! The LLM engine: the only module that calls into llama.cpp (`llama-cpp-sys-2`) and therefore
//! the only one with `unsafe` FFI code. Everything here is checked before it reaches the C API,
//! because llama.cpp answers many mistakes with `GGML_ASSERT`, which aborts the whole process.
//!
//! What it offers:
//! - [`GgufInfo::read`]: GGUF metadata (architecture, `n_embd`) without loading the weights;
//! - [`token_embedding_row`]: one dequantised row of `token_embd.weight`, read from the file;
//! - [`Model`]: a memory-mapped (by default) GGUF model with its tokenizer;
//! - [`Context::last_hidden`]: run a sequence of token and embedding inputs and return the final
//!   hidden state (after the final norm) at the last position only, reusing a cached prefix from
//!   the KV cache when the sequence starts with it;
//! - [`Context::many_hidden`]: the same for several prompts (users) decoded together, one
//!   sequence each, in shared llama.cpp batches;
//! - [`Context::session_hidden`]: the same, continuing from a saved KV state of an earlier
//!   prompt that shares its start (kiosk sessions), and saving the state for the next one;
//! - [`quantize`]: llama.cpp's model quantizer.

use anyhow::{bail, ensure, Context as _, Result};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, CStr, CString};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};

pub type Token = i32;

/// The sequence that holds the shared prefix in the KV cache.
const PREFIX_SEQ: i32 = 0;
/// The sequence a request is decoded on.
const WORK_SEQ: i32 = 1;
/// Branches of one request (see [`Context::branch_hidden`]) use sequences from here on.
const FIRST_BRANCH_SEQ: i32 = 2;
/// Most branches decoded together (each is one sequence and one output row).
pub const MAX_BRANCHES: usize = 16;

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
static LOGGER: Once = Once::new();

/// llama.cpp's and ggml's log, forwarded to stderr only in verbose mode.
unsafe extern "C" fn forward_log(
    _level: sys::ggml_log_level,
    text: *const c_char,
    _user_data: *mut std::ffi::c_void,
) {
    if VERBOSE.load(Ordering::Relaxed) && !text.is_null() {
        use std::io::Write;
        // SAFETY: llama.cpp passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// Routes llama.cpp's and ggml's log through [`forward_log`] before any other call into them
/// (GGUF header reads included), so that nothing reaches stderr unless verbose mode is on.
fn install_logger() {
    LOGGER.call_once(|| {
        // SAFETY: a valid callback that lives for the whole process.
        unsafe {
            sys::llama_log_set(Some(forward_log), std::ptr::null_mut());
            sys::ggml_log_set(Some(forward_log), std::ptr::null_mut());
        }
    });
}

/// Lets llama.cpp's own log through to stderr (`--verbose`), or silences it (the default).
pub fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
    install_logger();
}

/// Initialises llama.cpp once per process (its log stays as [`set_verbose`] set it).
fn backend() -> &'static LlamaBackend {
    install_logger();
    BACKEND.get_or_init(|| {
        let b = LlamaBackend::init().expect("llama.cpp backend initialised twice");
        crate::kernels::install();
        #[cfg(feature = "cpu-variants")]
        CPU_VARIANT.get_or_init(variants::load_best);
        b
    })
}

/// The CPU variant loaded at start-up (builds with the `cpu-variants` feature), or why none was.
#[cfg(feature = "cpu-variants")]
static CPU_VARIANT: OnceLock<std::result::Result<(crate::cpu::Choice, PathBuf), String>> =
    OnceLock::new();

/// Fails when this build loads its CPU code at run time and could not (names the folder).
fn check_cpu_backend() -> Result<()> {
    backend();
    #[cfg(feature = "cpu-variants")]
    if let Some(Err(e)) = CPU_VARIANT.get() {
        bail!("{e}");
    }
    Ok(())
}

/// Which CPU code this build runs, and why (for `illmrec info`).
pub fn cpu_build() -> String {
    backend();
    #[cfg(feature = "cpu-variants")]
    {
        match CPU_VARIANT.get() {
            Some(Ok((c, path))) => format!("{} from {} ({})", c.name, path.display(), c.reason),
            Some(Err(e)) => format!("none loaded: {e}"),
            None => "not initialised".into(),
        }
    }
    #[cfg(not(feature = "cpu-variants"))]
    {
        let mut on = Vec::new();
        for (flag, name) in [
            (cfg!(target_feature = "avx2"), "AVX2"),
            (cfg!(target_feature = "avx512f"), "AVX-512"),
        ] {
            if flag {
                on.push(name);
            }
        }
        format!(
            "one CPU build, fixed at compile time (see `backends` for its instruction sets{}); \
             build with `--features cpu-variants` to choose the best of ggml's CPU variants at run time",
            if on.is_empty() { String::new() } else { format!("; Rust code: {}", on.join(", ")) }
        )
    }
}

/// Run-time choice among ggml's CPU variants (`libggml-cpu-<name>.so`, built by llama.cpp's
/// GGML_CPU_ALL_VARIANTS): every variant reports a score for this CPU (0 = cannot run), and the
/// best one is loaded, with the AMX variant allowed only when [`crate::cpu`] proved AMX runs.
#[cfg(feature = "cpu-variants")]
mod variants {
    use super::sys;
    use crate::cpu::{choose_variant, Choice, Features};
    use std::ffi::CString;
    use std::path::{Path, PathBuf};

    /// Where the variants are: `ILLMREC_CPU_VARIANTS_DIR`, else next to the executable.
    fn dir() -> std::result::Result<PathBuf, String> {
        if let Some(d) = std::env::var_os("ILLMREC_CPU_VARIANTS_DIR") {
            return Ok(PathBuf::from(d));
        }
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot locate the executable: {e}"))?;
        let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        // `cargo test` runs binaries from target/<profile>/deps; the libraries sit one level up.
        if dir.file_name().is_some_and(|n| n == "deps") && !has_variants(&dir) {
            if let Some(up) = dir.parent() {
                return Ok(up.to_path_buf());
            }
        }
        Ok(dir)
    }

    fn has_variants(dir: &Path) -> bool {
        list(dir).map(|v| !v.is_empty()).unwrap_or(false)
    }

    fn list(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(v) = name
                .strip_prefix("libggml-cpu-")
                .and_then(|n| n.strip_suffix(".so"))
            {
                out.push((v.to_string(), p.clone()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// ggml's own score of one variant for this CPU, read without loading it as a backend.
    fn score(path: &Path) -> i32 {
        let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
            return 0;
        };
        // SAFETY: dlopen/dlsym/dlclose on a file we list; the symbol has ggml's documented
        // signature `int ggml_backend_score(void)` and only reads CPUID.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                return 0;
            }
            let f = libc::dlsym(h, c"ggml_backend_score".as_ptr());
            let s = if f.is_null() {
                0
            } else {
                let f: extern "C" fn() -> i32 = std::mem::transmute(f);
                f()
            };
            libc::dlclose(h);
            s
        }
    }

    pub fn load_best() -> std::result::Result<(Choice, PathBuf), String> {
        let dir = dir()?;
        let found = list(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        if found.is_empty() {
            return Err(format!(
                "no ggml CPU variants (libggml-cpu-*.so) in {}; set ILLMREC_CPU_VARIANTS_DIR",
                dir.display()
            ));
        }
        let scored: Vec<(String, i32)> = found.iter().map(|(n, p)| (n.clone(), score(p))).collect();
        let features = Features::detect();
        let choice = choose_variant(&scored, features.amx_usable()).ok_or_else(|| {
            format!(
                "none of the CPU variants in {} runs on this CPU",
                dir.display()
            )
        })?;
        let path = found
            .iter()
            .find(|(n, _)| *n == choice.name)
            .map(|(_, p)| p.clone())
            .unwrap();
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: registers the backend library with ggml; returns null on failure.
        let reg = unsafe { sys::ggml_backend_load(c.as_ptr()) };
        if reg.is_null() {
            return Err(format!("ggml could not load {}", path.display()));
        }
        Ok((choice, path))
    }
}

/// Metadata read from a GGUF header without loading tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufInfo {
    pub architecture: String,
    pub n_embd: usize,
    pub context_length: Option<usize>,
    pub name: Option<String>,
}

/// RAII wrapper over `gguf_context` (metadata only, `no_alloc`).
struct GgufFile {
    raw: NonNull<sys::gguf_context>,
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self> {
        check_gguf_magic(path)?;
        install_logger();
        let c_path = path_to_cstring(path)?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: valid C string; gguf returns NULL on malformed files rather than aborting.
        let raw = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        let raw = NonNull::new(raw).with_context(|| {
            format!(
                "{} is not a readable GGUF file (corrupt or truncated header)",
                path.display()
            )
        })?;
        Ok(Self { raw })
    }

    fn key(&self, key: &str) -> Option<i64> {
        let c_key = CString::new(key).ok()?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_key(self.raw.as_ptr(), c_key.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn string(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: the type is checked before the typed getter, which asserts on a mismatch.
        unsafe {
            if sys::gguf_get_kv_type(self.raw.as_ptr(), id) != sys::GGUF_TYPE_STRING {
                return None;
            }
            let s = sys::gguf_get_val_str(self.raw.as_ptr(), id);
            (!s.is_null()).then(|| CStr::from_ptr(s).to_string_lossy().into_owned())
        }
    }

    fn integer(&self, key: &str) -> Option<u64> {
        let id = self.key(key)?;
        let ctx = self.raw.as_ptr();
        // SAFETY: each typed getter is called only for its own type.
        unsafe {
            match sys::gguf_get_kv_type(ctx, id) {
                sys::GGUF_TYPE_UINT32 => Some(sys::gguf_get_val_u32(ctx, id) as u64),
                sys::GGUF_TYPE_INT32 => u64::try_from(sys::gguf_get_val_i32(ctx, id)).ok(),
                sys::GGUF_TYPE_UINT64 => Some(sys::gguf_get_val_u64(ctx, id)),
                sys::GGUF_TYPE_INT64 => u64::try_from(sys::gguf_get_val_i64(ctx, id)).ok(),
                _ => None,
            }
        }
    }

    fn info(&self, path: &Path) -> Result<GgufInfo> {
        let architecture = self
            .string("general.architecture")
            .with_context(|| format!("GGUF {} has no general.architecture", path.display()))?;
        let n_embd = self
            .integer(&format!("{architecture}.embedding_length"))
            .with_context(|| {
                format!(
                    "GGUF {} has no {architecture}.embedding_length",
                    path.display()
                )
            })?;
        Ok(GgufInfo {
            n_embd: n_embd as usize,
            context_length: self
                .integer(&format!("{architecture}.context_length"))
                .map(|v| v as usize),
            name: self.string("general.name"),
            architecture,
        })
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: created by gguf_init_from_file, freed once.
        unsafe { sys::gguf_free(self.raw.as_ptr()) }
    }
}

impl GgufInfo {
    /// Reads the metadata of a GGUF file (a regular file: a FIFO or device is refused).
    pub fn read(path: &Path) -> Result<Self> {
        GgufFile::open(path)?.info(path)
    }

    /// Parses GGUF bytes held in memory (a header is enough: tensor data is not read); `name`
    /// only names them in messages.
    pub fn parse(bytes: &[u8], name: &Path) -> Result<Self> {
        ensure!(
            bytes.starts_with(b"GGUF"),
            "{} is not a GGUF model file (wrong magic bytes)",
            name.display()
        );
        install_logger();
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: the buffer is valid for its length for the whole call; gguf copies what it keeps.
        let raw = unsafe { sys::gguf_init_from_buffer(bytes.as_ptr().cast(), bytes.len(), params) };
        let raw = NonNull::new(raw).with_context(|| {
            format!(
                "{} is not a readable GGUF file (corrupt or truncated header)",
                name.display()
            )
        })?;
        GgufFile { raw }.info(name)
    }

    /// The factor llama.cpp applies to token-embedding rows inside the graph, and which an
    /// injected vector therefore needs to be equivalent to a token: √n_embd for Gemma models.
    pub fn input_scale(&self) -> f32 {
        if self.architecture.starts_with("gemma") {
            (self.n_embd as f32).sqrt()
        } else {
            1.0
        }
    }
}

fn check_gguf_magic(path: &Path) -> Result<()> {
    let mut file = crate::fsutil::open_regular(path)
        .with_context(|| format!("cannot open model {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    ensure!(
        n == 4 && &magic == b"GGUF",
        "{} is not a GGUF model file (wrong magic bytes)",
        path.display()
    );
    Ok(())
}

fn path_to_cstring(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// Reads and dequantises row `token` of `token_embd.weight` straight from the GGUF file. The row
/// is returned as stored: multiply by [`GgufInfo::input_scale`] to get what the graph feeds in.
pub fn token_embedding_row(path: &Path, token: Token) -> Result<Vec<f32>> {
    let gguf = GgufFile::open(path)?;
    let info = gguf.info(path)?;
    let ctx = gguf.raw.as_ptr();
    let name = CString::new("token_embd.weight").unwrap();
    // SAFETY: valid context; indices come from gguf itself.
    let (ty, offset, size) = unsafe {
        let id = sys::gguf_find_tensor(ctx, name.as_ptr());
        ensure!(id >= 0, "GGUF {} has no token_embd.weight", path.display());
        (
            sys::gguf_get_tensor_type(ctx, id),
            sys::gguf_get_data_offset(ctx) + sys::gguf_get_tensor_offset(ctx, id),
            sys::gguf_get_tensor_size(ctx, id),
        )
    };
    // SAFETY: pure function of the type and length.
    let row_bytes = unsafe { sys::ggml_row_size(ty, info.n_embd as i64) };
    let n_rows = size / row_bytes;
    ensure!(
        token >= 0 && (token as usize) < n_rows,
        "token {token} is outside the vocabulary (0..{n_rows})"
    );
    let mut raw = vec![0u8; row_bytes];
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(
        (offset + token as usize * row_bytes) as u64,
    ))?;
    file.read_exact(&mut raw)
        .with_context(|| format!("GGUF {} is truncated", path.display()))?;
    let mut out = vec![0f32; info.n_embd];
    if ty == sys::GGML_TYPE_F32 {
        out.iter_mut()
            .zip(raw.chunks_exact(4))
            .for_each(|(o, c)| *o = f32::from_le_bytes(c.try_into().unwrap()));
        return Ok(out);
    }
    // SAFETY: traits exist for every ggml type; `to_float` reads exactly one row of n_embd values.
    unsafe {
        let traits = sys::ggml_get_type_traits(ty);
        let to_float = (*traits)
            .to_float
            .with_context(|| format!("ggml type {ty} cannot be dequantised"))?;
        to_float(raw.as_ptr().cast(), out.as_mut_ptr(), info.n_embd as i64);
    }
    Ok(out)
}

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
    raw: NonNull<sys::llama_model>,
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
        crate::blas::ensure()?;
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

    fn check_tokens(&self, tokens: &[Token]) -> Result<()> {
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

/// How to create an inference context.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// KV-cache size in positions, shared by the cached prefix and one request.
    pub n_ctx: u32,
    /// Store the KV cache in f32 instead of llama.cpp's default f16 (for parity checks).
    pub kv_f32: bool,
    /// Flash attention: `Some(true)` (the default), `Some(false)` (the plain path, which
    /// multiplies every query by every KV cell llama.cpp attends over and masks afterwards), or
    /// `None` (llama.cpp decides). On the CPU both paths give the same result at any thread
    /// count: ggml computes each query row whole on one thread, except for a one-position batch
    /// over 512 or more cells, which [`batch_spans`] never sends.
    pub flash_attn: Option<bool>,
    /// Largest number of positions decoded in one call.
    pub n_batch: u32,
    pub n_threads: i32,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            n_ctx: 2048,
            kv_f32: false,
            flash_attn: Some(true),
            n_batch: 512,
            n_threads: default_threads(),
        }
    }
}

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
}

/// Most CPU threads accepted: four per available core (more only slows llama.cpp down, and
/// tens of thousands make it abort).
pub fn max_threads() -> i32 {
    default_threads().saturating_mul(4)
}

/// Checks a thread count against 1..=[`max_threads`].
pub fn check_threads(n: i32) -> Result<()> {
    ensure!(
        (1..=max_threads()).contains(&n),
        "--threads {n} is out of range: expected 1 to {} (4 × the {} available cores)",
        max_threads(),
        default_threads()
    );
    Ok(())
}

impl ContextOptions {
    /// Checks the thread count (before anything is loaded).
    pub fn check_threads(&self) -> Result<()> {
        check_threads(self.n_threads)
    }

    /// Checks the options against a model before any memory is allocated: the thread count,
    /// and a context no smaller than 16 positions and no larger than the model was trained
    /// for (its KV cache grows with it; llama.cpp would try to allocate whatever it is given).
    pub fn check(&self, info: &GgufInfo) -> Result<()> {
        self.check_threads()?;
        ensure!(
            self.n_ctx >= 16,
            "--ctx {} is too small: expected at least 16 positions",
            self.n_ctx
        );
        if let Some(max) = info.context_length {
            ensure!(
                self.n_ctx as usize <= max,
                "--ctx {} is larger than the model's training context ({max} positions)",
                self.n_ctx
            );
        }
        Ok(())
    }
}

/// KV cells that several prompts decoded together hold at once: the cached prefix plus each
/// prompt's positions after the part it shares with the prefix (those cells are shared).
pub fn kv_cells_needed(prefix: usize, lens: &[usize], shared: &[usize]) -> usize {
    prefix
        + lens
            .iter()
            .zip(shared.iter().chain(std::iter::repeat(&0)))
            .map(|(&n, &s)| n - s.min(n))
            .sum::<usize>()
}

/// Splits prompts (in order) into consecutive groups for [`Context::many_hidden`]: each group
/// holds at most `per_call` prompts (and at most [`MAX_BRANCHES`]) whose KV cells fit `n_ctx`
/// together; a prompt that fits only alone is a group of its own. `shared[k]` is how many of
/// prompt k's leading positions come from the cached prefix of `prefix` positions.
pub fn group_prompts(
    lens: &[usize],
    shared: &[usize],
    prefix: usize,
    n_ctx: usize,
    per_call: usize,
) -> Vec<std::ops::Range<usize>> {
    let per_call = per_call.clamp(1, MAX_BRANCHES);
    let mut groups = Vec::new();
    let mut start = 0;
    let mut cells = prefix;
    for (k, (&n, &s)) in lens.iter().zip(shared).enumerate() {
        let own = n - s.min(n);
        if k > start && (k - start == per_call || cells + own > n_ctx) {
            groups.push(start..k);
            start = k;
            cells = prefix;
        }
        cells += own;
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

/// One position of the LLM input: a vocabulary token or a vector in the input-embedding space.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Token(Token),
    Embedding(&'a [f32]),
}

/// One position of a batch: its input, sequence and position.
#[derive(Clone, Copy)]
struct Entry<'a> {
    input: Input<'a>,
    seq: i32,
    pos: usize,
}

/// An inference context with a KV cache. Holds at most one cached prefix (on its own sequence)
/// that requests starting with the same tokens reuse.
pub struct Context {
    raw: NonNull<sys::llama_context>,
    model: Arc<Model>,
    n_ctx: usize,
    n_batch: usize,
    prefix: Vec<Token>,
    /// Where llama.cpp's graph callback leaves the outputs' hidden states; boxed so its address,
    /// handed to llama.cpp, stays fixed. Dropped after the context (fields drop after `drop`).
    capture: Box<Capture>,
}

/// The name llama.cpp gives the final-norm hidden states of a batch's outputs (its `t_embd`,
/// what `llama_get_embeddings_ith` returns), the tensor before the LM head.
const HIDDEN_TENSOR: &[u8] = b"result_norm";

/// Filled by [`capture_hidden`] while a batch with outputs runs.
#[derive(Default)]
struct Capture {
    active: bool,
    rows: Vec<f32>,
}

/// llama.cpp's graph callback (`cb_eval`). Asked about every node, it wants only
/// [`HIDDEN_TENSOR`] and only while a batch with outputs runs; given it, it copies the rows and
/// stops the rest of that graph split: the LM head that follows (262,144 × 640 for Gemma 3, read
/// for every request) is never needed, because the runtime reads hidden states, not logits.
/// Reading the states this way lets the outputs ride in the same batch as the positions before
/// them, where llama.cpp's own embeddings output would make every position of the batch an
/// output.
unsafe extern "C" fn capture_hidden(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut std::ffi::c_void,
) -> bool {
    // SAFETY: `user` is the context's boxed Capture, used only during its `&mut self` calls;
    // `t` is a live graph node with a NUL-terminated name.
    let cap = &mut *(user as *mut Capture);
    if !cap.active || CStr::from_ptr((*t).name.as_ptr()).to_bytes() != HIDDEN_TENSOR {
        return false; // not needed (ask) / not reached for unneeded nodes
    }
    if ask {
        return true;
    }
    let n = sys::ggml_nelements(t) as usize;
    let start = cap.rows.len();
    cap.rows.resize(start + n, 0.0);
    sys::ggml_backend_tensor_get(
        t,
        cap.rows[start..].as_mut_ptr().cast(),
        0,
        n * std::mem::size_of::<f32>(),
    );
    false // stop this split here: nothing after the hidden states is used
}

// SAFETY: a llama_context may move between threads; `&mut self` on every call that uses it keeps
// it to one thread at a time (it is not Sync).
unsafe impl Send for Context {}

/// A position of a saved prompt, owned (see [`SavedState`]).
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedInput {
    Token(Token),
    Embedding(Vec<f32>),
}

impl OwnedInput {
    pub fn of(input: &Input) -> Self {
        match input {
            Input::Token(t) => OwnedInput::Token(*t),
            Input::Embedding(v) => OwnedInput::Embedding(v.to_vec()),
        }
    }

    fn same(&self, input: &Input) -> bool {
        match (self, input) {
            (OwnedInput::Token(a), Input::Token(b)) => a == b,
            (OwnedInput::Embedding(a), Input::Embedding(b)) => a.as_slice() == *b,
            _ => false,
        }
    }
}

/// The KV cache of the start of a prompt (positions `0..inputs.len()`), as llama.cpp's sequence
/// state bytes, with the inputs it holds. Any context on the same model and options can continue
/// from it ([`Context::session_hidden`]).
#[derive(Clone, Debug, Default)]
pub struct SavedState {
    pub inputs: Vec<OwnedInput>,
    pub kv: Vec<u8>,
}

impl SavedState {
    /// Bytes held (KV state and inputs).
    pub fn size(&self) -> usize {
        self.kv.len()
            + self
                .inputs
                .iter()
                .map(|i| match i {
                    OwnedInput::Token(_) => 4,
                    OwnedInput::Embedding(v) => 4 * v.len(),
                })
                .sum::<usize>()
    }

    /// How many leading positions of `inputs` this state holds (its common start with them).
    pub fn common_len(&self, inputs: &[Input]) -> usize {
        self.inputs
            .iter()
            .zip(inputs)
            .take_while(|(a, b)| a.same(b))
            .count()
    }
}

impl Context {
    /// Creates a context on a shared model.
    pub fn new(model: Arc<Model>, opts: &ContextOptions) -> Result<Self> {
        opts.check(&model.info)?;
        let n_batch = opts.n_batch.clamp(1, opts.n_ctx);
        let mut capture = Box::<Capture>::default();
        // SAFETY: default params are a valid struct; the context holds an Arc of the model, so the
        // model outlives it, and owns `capture`, which outlives the llama.cpp context.
        let raw = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = opts.n_ctx;
            p.n_batch = n_batch;
            p.n_ubatch = n_batch;
            p.n_seq_max = FIRST_BRANCH_SEQ as u32 + MAX_BRANCHES as u32;
            // Only the last position of a request (or of each branch) is ever an output: keep the
            // output buffer (n_vocab floats per row) small instead of the default n_batch rows.
            // llama.cpp reserves at least n_seq_max output rows.
            p.n_outputs_max = p.n_seq_max;
            p.cb_eval = Some(capture_hidden);
            p.cb_eval_user_data = (&mut *capture as *mut Capture).cast();
            p.n_threads = opts.n_threads;
            p.n_threads_batch = opts.n_threads;
            p.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
            // Hidden states come from the graph callback (`capture_hidden`): with llama.cpp's
            // embeddings on, every position of a batch would be an output.
            p.embeddings = false;
            p.kv_unified = true;
            p.flash_attn_type = match opts.flash_attn {
                None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
                Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            };
            if opts.kv_f32 {
                p.type_k = sys::GGML_TYPE_F32;
                p.type_v = sys::GGML_TYPE_F32;
            }
            sys::llama_init_from_model(model.raw.as_ptr(), p)
        };
        let raw =
            NonNull::new(raw).context("llama.cpp could not create a context (out of memory?)")?;
        Ok(Context {
            raw,
            model,
            n_ctx: opts.n_ctx as usize,
            n_batch: n_batch as usize,
            prefix: Vec::new(),
            capture,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context.
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    /// Decodes `tokens` once on the prefix sequence, so that later requests that start with
    /// them skip that work. Replaces any earlier prefix.
    pub fn set_prefix(&mut self, tokens: &[Token]) -> Result<()> {
        self.model.check_tokens(tokens)?;
        ensure!(
            tokens.len() < self.n_ctx / 2,
            "prefix of {} tokens does not fit a context of {}",
            tokens.len(),
            self.n_ctx
        );
        // SAFETY: valid memory handle; removing a whole sequence cannot fail.
        unsafe { sys::llama_memory_seq_rm(self.memory(), PREFIX_SEQ, -1, -1) };
        self.prefix.clear();
        let inputs: Vec<Input> = tokens.iter().map(|&t| Input::Token(t)).collect();
        self.decode(&inputs, PREFIX_SEQ, 0, false)?;
        self.prefix = tokens.to_vec();
        Ok(())
    }

    pub fn prefix(&self) -> &[Token] {
        &self.prefix
    }

    /// Runs `inputs` and returns the final hidden state (after the final norm) at the last
    /// position. The inputs that match the cached prefix are copied from the KV cache when
    /// `reuse_prefix` is set, and recomputed in a batch of their own otherwise; either way the
    /// rest is decoded in the same batches, so both paths compute the same thing.
    pub fn last_hidden(&mut self, inputs: &[Input], reuse_prefix: bool) -> Result<Vec<f32>> {
        ensure!(!inputs.is_empty(), "empty input");
        for input in inputs {
            self.check_input(input)?;
        }
        let shared = self.shared_prefix_len(inputs);
        let needed = self.prefix.len() + inputs.len() - if reuse_prefix { shared } else { 0 };
        ensure!(
            needed <= self.n_ctx,
            "prompt of {} positions does not fit the context ({} positions, {} held by the cached prefix); raise --ctx",
            inputs.len(),
            self.n_ctx,
            self.prefix.len()
        );
        let mem = self.memory();
        // SAFETY: valid memory handle and sequence ids below n_seq_max.
        unsafe {
            sys::llama_memory_seq_rm(mem, WORK_SEQ, -1, -1);
            if reuse_prefix && shared > 0 {
                sys::llama_memory_seq_cp(mem, PREFIX_SEQ, WORK_SEQ, 0, shared as i32);
            }
        }
        let result = (|| {
            if !reuse_prefix {
                self.decode(&inputs[..shared], WORK_SEQ, 0, false)?;
            }
            self.decode(&inputs[shared..], WORK_SEQ, shared, true)
        })();
        // SAFETY: as above; frees the request's cells whatever happened.
        unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, -1, -1) };
        let hidden = result?.context("no hidden state was produced")?;
        ensure!(
            hidden.iter().all(|x| x.is_finite()),
            "the model produced a non-finite hidden state"
        );
        Ok(hidden)
    }

    /// Length of the common start of the cached prefix and the inputs' tokens, leaving at least
    /// the last input to be decoded.
    pub fn shared_prefix_len(&self, inputs: &[Input]) -> usize {
        let n = self
            .prefix
            .iter()
            .zip(inputs)
            .take_while(|(p, i)| matches!(i, Input::Token(t) if t == *p))
            .count();
        n.min(inputs.len() - 1)
    }

    /// Final hidden states at the end of several inputs that share a start, decoding the shared
    /// part once: `shared` is decoded (after the cached prefix, as in [`Context::last_hidden`]),
    /// then branch k continues from the first `cut_k` positions of `shared` with its own `suffix_k`
    /// (on a sequence of its own that shares those KV cells), all branches' suffixes in the same
    /// batches. Returns one hidden state per branch, at its last position. Up to
    /// [`MAX_BRANCHES`] branches; `0 < cut_k <= shared.len()` and every suffix is non-empty.
    ///
    /// This is how a window of history items yields the states of all its prefixes for the price
    /// of one prompt plus the closing text per prefix, and how a kiosk session extends its history.
    pub fn branch_hidden(
        &mut self,
        shared: &[Input],
        branches: &[(usize, Vec<Input>)],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(!shared.is_empty(), "empty input");
        ensure!(
            !branches.is_empty() && branches.len() <= MAX_BRANCHES,
            "between 1 and {MAX_BRANCHES} branches, not {}",
            branches.len()
        );
        for (cut, suffix) in branches {
            ensure!(
                *cut >= 1 && *cut <= shared.len() && !suffix.is_empty(),
                "branch cut {cut} outside 1..={} or empty suffix",
                shared.len()
            );
        }
        for input in shared
            .iter()
            .chain(branches.iter().flat_map(|(_, s)| s.iter()))
        {
            self.check_input(input)?;
        }
        let shared_prefix = self.shared_prefix_len(shared);
        let longest = branches.iter().map(|(c, s)| c + s.len()).max().unwrap_or(0);
        let suffixes: usize = branches.iter().map(|(_, s)| s.len()).sum();
        let needed = self.prefix.len() + shared.len() + suffixes
            - if reuse_prefix { shared_prefix } else { 0 };
        ensure!(
            needed <= self.n_ctx && longest <= self.n_ctx,
            "{} branches of up to {longest} positions need {needed} KV cells, the context has {}; raise --ctx",
            branches.len(),
            self.n_ctx
        );
        let mem = self.memory();
        let seqs = FIRST_BRANCH_SEQ..FIRST_BRANCH_SEQ + branches.len() as i32;
        // SAFETY: valid memory handle and sequence ids below n_seq_max.
        unsafe {
            for s in std::iter::once(WORK_SEQ).chain(seqs.clone()) {
                sys::llama_memory_seq_rm(mem, s, -1, -1);
            }
            if reuse_prefix && shared_prefix > 0 {
                sys::llama_memory_seq_cp(mem, PREFIX_SEQ, WORK_SEQ, 0, shared_prefix as i32);
            }
        }
        let result = (|| {
            let start = if reuse_prefix { shared_prefix } else { 0 };
            // The shared part, up to the longest cut (what no branch uses is not decoded).
            let shared_end = branches.iter().map(|(c, _)| *c).max().unwrap_or(0);
            self.decode(
                &shared[start.min(shared_end)..shared_end],
                WORK_SEQ,
                start.min(shared_end),
                false,
            )?;
            for (seq, (cut, _)) in seqs.clone().zip(branches) {
                // SAFETY: as above.
                unsafe { sys::llama_memory_seq_cp(mem, WORK_SEQ, seq, 0, *cut as i32) };
            }
            let tails: Vec<(i32, usize, &[Input])> = seqs
                .clone()
                .zip(branches)
                .map(|(seq, (cut, suffix))| (seq, *cut, suffix.as_slice()))
                .collect();
            self.decode_tails(&tails)
        })();
        // SAFETY: as above; frees the request's cells whatever happened.
        unsafe {
            for s in std::iter::once(WORK_SEQ).chain(seqs) {
                sys::llama_memory_seq_rm(mem, s, -1, -1);
            }
        }
        let hidden = result?;
        ensure!(
            hidden.iter().flatten().all(|x| x.is_finite()),
            "the model produced a non-finite hidden state"
        );
        Ok(hidden)
    }

    /// Final hidden states at the end of several independent prompts (several users), decoded
    /// together: request k runs on a sequence of its own, starting from the cached prefix's KV
    /// cells where it begins with them and `reuse_prefix` is set (one shared copy of the prefix,
    /// no recomputation), and all requests' remaining positions share llama.cpp batches of up to
    /// n_batch positions; the last position of each is an output. Returns one hidden state per
    /// request, in order. Up to [`MAX_BRANCHES`] requests whose positions fit the context
    /// together (see [`group_prompts`]).
    ///
    /// Each state equals its request's [`Context::last_hidden`] within llama.cpp's batch-shape
    /// noise (the positions are summed in other batch shapes), not bit for bit.
    pub fn many_hidden(
        &mut self,
        requests: &[&[Input]],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(
            !requests.is_empty() && requests.len() <= MAX_BRANCHES,
            "between 1 and {MAX_BRANCHES} requests per call, not {}",
            requests.len()
        );
        for inputs in requests {
            ensure!(!inputs.is_empty(), "empty input");
            for input in inputs.iter() {
                self.check_input(input)?;
            }
        }
        let lens: Vec<usize> = requests.iter().map(|r| r.len()).collect();
        let shared: Vec<usize> = requests
            .iter()
            .map(|r| match reuse_prefix {
                true => self.shared_prefix_len(r),
                false => 0,
            })
            .collect();
        let needed = kv_cells_needed(self.prefix.len(), &lens, &shared);
        ensure!(
            needed <= self.n_ctx,
            "{} prompts of {} positions in all need {needed} KV cells, the context has {}; raise --ctx or batch fewer users",
            requests.len(),
            lens.iter().sum::<usize>(),
            self.n_ctx
        );
        let mem = self.memory();
        let seqs = FIRST_BRANCH_SEQ..FIRST_BRANCH_SEQ + requests.len() as i32;
        // SAFETY: valid memory handle and sequence ids below n_seq_max.
        unsafe {
            for (seq, &n) in seqs.clone().zip(&shared) {
                sys::llama_memory_seq_rm(mem, seq, -1, -1);
                if n > 0 {
                    sys::llama_memory_seq_cp(mem, PREFIX_SEQ, seq, 0, n as i32);
                }
            }
        }
        let result = (|| {
            let tails: Vec<(i32, usize, &[Input])> = seqs
                .clone()
                .zip(requests.iter().zip(&shared))
                .map(|(seq, (inputs, &start))| (seq, start, &inputs[start..]))
                .collect();
            self.decode_tails(&tails)
        })();
        // SAFETY: as above; frees the requests' cells whatever happened.
        unsafe {
            for s in seqs {
                sys::llama_memory_seq_rm(mem, s, -1, -1);
            }
        }
        let hidden = result?;
        ensure!(
            hidden.iter().flatten().all(|x| x.is_finite()),
            "the model produced a non-finite hidden state"
        );
        Ok(hidden)
    }

    /// Like [`Context::last_hidden`], but continues from `saved` when it shares a start with
    /// `inputs` longer than the cached task prefix (only the positions after the common start
    /// are decoded), and saves the KV state of `inputs[..save_at]` for the next call. Returns the
    /// hidden state, the new saved state and how many positions were decoded.
    ///
    /// The positions are decoded in other batch shapes than a cold [`Context::last_hidden`], so
    /// the state agrees with it within llama.cpp's batch-shape noise, not bit for bit.
    pub fn session_hidden(
        &mut self,
        saved: Option<&SavedState>,
        inputs: &[Input],
        save_at: usize,
        reuse_prefix: bool,
    ) -> Result<(Vec<f32>, SavedState, usize)> {
        ensure!(!inputs.is_empty(), "empty input");
        ensure!(
            save_at < inputs.len(),
            "save point {save_at} is not before the last of {} inputs",
            inputs.len()
        );
        for input in inputs {
            self.check_input(input)?;
        }
        let prefix = if reuse_prefix {
            self.shared_prefix_len(inputs)
        } else {
            0
        };
        let common = saved.map_or(0, |s| s.common_len(inputs).min(inputs.len() - 1));
        let restore = saved.filter(|_| common > prefix);
        let needed = self.prefix.len() + inputs.len();
        ensure!(
            needed <= self.n_ctx,
            "prompt of {} positions does not fit the context ({} positions, {} held by the cached prefix); raise --ctx",
            inputs.len(),
            self.n_ctx,
            self.prefix.len()
        );
        let mem = self.memory();
        let ctx = self.raw.as_ptr();
        // SAFETY: valid memory handle and sequence ids below n_seq_max.
        unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, -1, -1) };
        let result = (|| {
            let start = match restore {
                Some(state) => {
                    // SAFETY: the bytes came from llama_state_seq_get_data on a context of the
                    // same model and options; llama.cpp checks them and returns 0 when they do
                    // not fit.
                    let n = unsafe {
                        sys::llama_state_seq_set_data(
                            ctx,
                            state.kv.as_ptr(),
                            state.kv.len(),
                            WORK_SEQ,
                        )
                    };
                    ensure!(n > 0, "llama.cpp could not restore a saved session state");
                    // SAFETY: as above; drops what the state holds past the common start.
                    unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, common as i32, -1) };
                    common
                }
                None => {
                    if prefix > 0 {
                        // SAFETY: as above.
                        unsafe {
                            sys::llama_memory_seq_cp(mem, PREFIX_SEQ, WORK_SEQ, 0, prefix as i32)
                        };
                    }
                    prefix
                }
            };
            let start = if start > save_at {
                // SAFETY: as above.
                unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, save_at as i32, -1) };
                save_at
            } else {
                start
            };
            // One batch for everything after the common start, as a cold request decodes it
            // (batch shapes decide llama.cpp's kernels: fewer than 64 rows take ggml's flash-
            // attention path with f16 accumulators); the positions from `save_at` on are then
            // dropped and the rest saved. A position's KV cells do not depend on later ones.
            let hidden = self.decode(&inputs[start..], WORK_SEQ, start, true)?;
            // SAFETY: as above.
            unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, save_at as i32, -1) };
            // SAFETY: the buffer has the size llama.cpp asked for.
            let kv = unsafe {
                let size = sys::llama_state_seq_get_size(ctx, WORK_SEQ);
                let mut kv = vec![0u8; size];
                let n = sys::llama_state_seq_get_data(ctx, kv.as_mut_ptr(), size, WORK_SEQ);
                ensure!(n == size, "llama.cpp could not save the session state");
                kv
            };
            Ok((hidden, kv, inputs.len() - start))
        })();
        // SAFETY: as above; frees the request's cells whatever happened.
        unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, -1, -1) };
        let (hidden, kv, decoded) = result?;
        let hidden = hidden.context("no hidden state was produced")?;
        ensure!(
            hidden.iter().all(|x| x.is_finite()),
            "the model produced a non-finite hidden state"
        );
        let state = SavedState {
            inputs: inputs[..save_at].iter().map(OwnedInput::of).collect(),
            kv,
        };
        Ok((hidden, state, decoded))
    }

    fn check_input(&self, input: &Input) -> Result<()> {
        match input {
            Input::Token(t) => self.model.check_tokens(&[*t]),
            Input::Embedding(v) => {
                let n_embd = self.model.n_embd();
                ensure!(
                    v.len() == n_embd,
                    "injected vector has {} values, the model's n_embd is {n_embd}",
                    v.len()
                );
                ensure!(
                    v.iter().all(|x| x.is_finite()),
                    "injected vector contains NaN or infinity"
                );
                Ok(())
            }
        }
    }

    /// Decodes several sequences' tails together: tail `(seq, pos0, inputs)` continues `seq` at
    /// position `pos0`. All positions share batches; the last position of every tail is an
    /// output, and those hidden states are returned in order.
    fn decode_tails(&mut self, tails: &[(i32, usize, &[Input])]) -> Result<Vec<Vec<f32>>> {
        let entry = |seq, pos0: usize, j: usize, input| Entry {
            input,
            seq,
            pos: pos0 + j,
        };
        let mut entries: Vec<Entry> = tails
            .iter()
            .flat_map(|&(seq, pos0, inputs)| {
                inputs[..inputs.len() - 1]
                    .iter()
                    .enumerate()
                    .map(move |(j, &input)| entry(seq, pos0, j, input))
            })
            .collect();
        entries.extend(tails.iter().map(|&(seq, pos0, inputs)| {
            entry(seq, pos0, inputs.len() - 1, inputs[inputs.len() - 1])
        }));
        self.decode_entries(&entries, tails.len())
    }

    /// Decodes `inputs` at positions `pos0..` on `seq`, in calls of at most n_batch positions.
    /// With `output`, the hidden state of the last input is returned.
    fn decode(
        &mut self,
        inputs: &[Input],
        seq: i32,
        pos0: usize,
        output: bool,
    ) -> Result<Option<Vec<f32>>> {
        let entries: Vec<Entry> = inputs
            .iter()
            .enumerate()
            .map(|(k, &input)| Entry {
                input,
                seq,
                pos: pos0 + k,
            })
            .collect();
        let n_out = usize::from(output && !entries.is_empty());
        Ok(self.decode_entries(&entries, n_out)?.pop())
    }

    /// Decodes entries (any mix of sequences), in calls of at most n_batch positions. The last
    /// `n_out` entries (at most [`MAX_BRANCHES`]) are outputs: they ride in the same calls as
    /// the positions before them, and their hidden states are returned in order.
    fn decode_entries(&mut self, entries: &[Entry], n_out: usize) -> Result<Vec<Vec<f32>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        debug_assert!(n_out <= MAX_BRANCHES.min(self.n_batch) && n_out <= entries.len());
        let first_out = entries.len() - n_out;
        let n_embd = self.model.n_embd();
        let ctx = self.raw.as_ptr();
        let mut rows = Vec::with_capacity(n_out);
        for span in batch_spans(entries.len(), self.n_batch) {
            let chunk_start = span.start;
            let chunk = &entries[span];
            let chunk_out = (chunk_start + chunk.len()).saturating_sub(first_out.max(chunk_start));
            self.capture.rows.clear();
            self.capture.active = chunk_out > 0;
            // SAFETY: the batch is created for this context, filled within n_batch entries with
            // checked tokens and n_embd-long vectors (copied by llama.cpp), and freed below.
            let status = unsafe {
                let batch = sys::llama_batch_ext_init(ctx);
                ensure!(!batch.is_null(), "cannot allocate a batch");
                let mut fill_error = None;
                for (k, e) in chunk.iter().enumerate() {
                    let idx = match e.input {
                        Input::Token(t) => sys::llama_batch_ext_add_token(batch, e.seq, t),
                        Input::Embedding(v) => {
                            let embd = sys::llama_embd {
                                data: v.as_ptr(),
                                n_rows: 1,
                                n_embd,
                            };
                            sys::llama_batch_ext_add_embd(batch, e.seq, embd)
                        }
                    };
                    let pos = e.pos as sys::llama_pos;
                    let is_out = chunk_start + k >= first_out;
                    if idx < 0
                        || !sys::llama_batch_ext_set_pos(batch, idx, &pos)
                        || !sys::llama_batch_ext_set_output_embd(batch, idx, is_out)
                    {
                        fill_error = Some(idx);
                        break;
                    }
                }
                let status = match fill_error {
                    Some(idx) => Err(idx),
                    None => Ok(sys::llama_process(
                        ctx,
                        sys::LLAMA_PROCESS_TYPE_DECODE,
                        batch,
                    )),
                };
                sys::llama_batch_ext_free(batch);
                status
            };
            self.capture.active = false;
            match status {
                Err(code) => bail!("cannot build the llama.cpp batch (code {code})"),
                Ok(0) => {}
                Ok(1) => bail!("the KV cache is full; raise --ctx"),
                Ok(code) => bail!("llama.cpp decode failed with code {code}"),
            }
            ensure!(
                self.capture.rows.len() == chunk_out * n_embd,
                "llama.cpp's graph gave {} hidden values for {chunk_out} outputs of {n_embd} \
                 (a model without a `result_norm` tensor?)",
                self.capture.rows.len()
            );
            rows.extend(self.capture.rows.chunks(n_embd).map(<[f32]>::to_vec));
        }
        Ok(rows)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: freed once, before the model it borrows.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

/// Quantizes a GGUF model with llama.cpp's quantizer (`type_name` as in llama-quantize:
/// q8_0, q4_k_m, ...). Writes to a temporary file and renames it into place.
pub fn quantize(input: &Path, output: &Path, type_name: &str, n_threads: i32) -> Result<()> {
    let ftype = quant_type(type_name)?;
    check_threads(n_threads)?;
    GgufInfo::read(input)?;
    backend();
    let c_in = path_to_cstring(input)?;
    crate::fsutil::write_atomic_path(output, |tmp| {
        let c_tmp = path_to_cstring(tmp)?;
        // SAFETY: default params are valid; paths are valid C strings.
        let rc = unsafe {
            let mut params = sys::llama_model_quantize_default_params();
            params.ftype = ftype;
            params.nthread = n_threads;
            // Allows going from one quantized type to another (or back to f32/f16): the result
            // carries the input's quantization error, which is the point when measuring it.
            params.allow_requantize = true;
            sys::llama_model_quantize(c_in.as_ptr(), c_tmp.as_ptr(), &params)
        };
        ensure!(
            rc == 0,
            "llama.cpp failed to quantize {} to {type_name} (code {rc}; run with --verbose to see its log)",
            input.display()
        );
        Ok(())
    })
}

/// The quantization types offered by `illmrec quantize`.
pub const QUANT_TYPES: &[(&str, sys::llama_ftype)] = &[
    ("f32", sys::LLAMA_FTYPE_ALL_F32),
    ("f16", sys::LLAMA_FTYPE_MOSTLY_F16),
    ("bf16", sys::LLAMA_FTYPE_MOSTLY_BF16),
    ("q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0),
    ("q6_k", sys::LLAMA_FTYPE_MOSTLY_Q6_K),
    ("q5_k_m", sys::LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("q5_0", sys::LLAMA_FTYPE_MOSTLY_Q5_0),
    ("q4_k_m", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0),
    ("q3_k_m", sys::LLAMA_FTYPE_MOSTLY_Q3_K_M),
    ("q2_k", sys::LLAMA_FTYPE_MOSTLY_Q2_K),
];

fn quant_type(name: &str) -> Result<sys::llama_ftype> {
    let lower = name.to_ascii_lowercase();
    QUANT_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
        .with_context(|| {
            let names: Vec<&str> = QUANT_TYPES.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown quantization type '{name}' (expected one of {})",
                names.join(", ")
            )
        })
}

/// llama.cpp's description of the compute backends compiled in (CPU features, CUDA, Metal).
pub fn system_info() -> String {
    backend();
    // SAFETY: returns a static C string.
    unsafe {
        CStr::from_ptr(sys::llama_print_system_info())
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether llama.cpp's ggml has its BLAS backend compiled in (registered as "BLAS").
pub fn has_blas_backend() -> bool {
    backend();
    // SAFETY: a NUL-terminated name; the registry is only read.
    unsafe { !sys::ggml_backend_reg_by_name(c"BLAS".as_ptr()).is_null() }
}

/// Whether this build can offload layers to a GPU.
pub fn supports_gpu_offload() -> bool {
    backend();
    // SAFETY: plain query.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// How `decode_entries` cuts `len` positions into llama.cpp calls of at most `n_batch`: in
/// order, never a one-position call after a longer one (the tail borrows a position from the call
/// before it). ggml's CPU flash attention splits a lone query's KV cells across threads, which
/// would make that position's state depend on the thread count.
pub fn batch_spans(len: usize, n_batch: usize) -> Vec<std::ops::Range<usize>> {
    let n_batch = n_batch.max(1);
    let mut spans: Vec<std::ops::Range<usize>> = (0..len)
        .step_by(n_batch)
        .map(|start| start..(start + n_batch).min(len))
        .collect();
    if let [.., before, last] = spans.as_mut_slice() {
        if last.len() == 1 && before.len() > 2 {
            before.end -= 1;
            last.start -= 1;
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_grouped_in_order_within_the_context_and_the_call_size() {
        // prefix 10, context 100: own cells are n - shared.
        let lens = [30, 30, 30, 30, 96, 5];
        let shared = [10, 10, 10, 10, 10, 0];
        // 10 + 4 × 20 = 90 fit; 86 more do not; 86 alone fits (10 + 86 = 96); 5 more do not
        // (101 > 100): a group of their own.
        assert_eq!(
            group_prompts(&lens, &shared, 10, 100, 8),
            vec![0..4, 4..5, 5..6]
        );
        assert_eq!(
            group_prompts(&lens, &shared, 10, 100, 2),
            vec![0..2, 2..4, 4..5, 5..6]
        );
        assert_eq!(group_prompts(&lens, &shared, 10, 100, 1).len(), lens.len());
        // per_call is capped at MAX_BRANCHES and at least 1.
        let many = vec![1; 40];
        let zero = vec![0; 40];
        let g = group_prompts(&many, &zero, 0, 10_000, 100);
        assert!(g.iter().all(|r| r.len() <= MAX_BRANCHES));
        assert_eq!(g.iter().map(|r| r.len()).sum::<usize>(), 40);
        assert_eq!(group_prompts(&many, &zero, 0, 10_000, 0).len(), 40);
        assert!(group_prompts(&[], &[], 0, 100, 4).is_empty());
        assert_eq!(kv_cells_needed(10, &[30, 30], &[10, 0]), 10 + 20 + 30);
    }

    #[test]
    fn calls_cover_the_positions_in_order_without_a_lone_last_position() {
        let covers = |spans: &[std::ops::Range<usize>], len: usize, n_batch: usize| {
            assert_eq!(spans.first().map_or(0, |r| r.start), 0);
            assert_eq!(spans.last().map_or(0, |r| r.end), len);
            assert!(spans.windows(2).all(|w| w[0].end == w[1].start));
            assert!(spans.iter().all(|r| !r.is_empty() && r.len() <= n_batch));
        };
        assert_eq!(batch_spans(513, 512), vec![0..511, 511..513]);
        assert_eq!(batch_spans(1025, 512), vec![0..512, 512..1023, 1023..1025]);
        assert_eq!(batch_spans(512, 512), vec![0..512]);
        assert_eq!(batch_spans(514, 512), vec![0..512, 512..514]);
        assert_eq!(batch_spans(1, 512), vec![0..1]);
        assert!(batch_spans(0, 512).is_empty());
        for n_batch in [3, 4, 64, 512] {
            for len in 0..3 * n_batch + 2 {
                let spans = batch_spans(len, n_batch);
                covers(&spans, len, n_batch);
                assert!(
                    len < 2 || spans.iter().all(|r| r.len() >= 2),
                    "{len} {n_batch}"
                );
            }
        }
        // Calls of one or two positions cannot avoid it; they still cover everything.
        covers(&batch_spans(5, 2), 5, 2);
        covers(&batch_spans(3, 1), 3, 1);
        covers(&batch_spans(3, 0), 3, 1);
    }
}
