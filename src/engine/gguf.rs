//! GGUF files without loading the weights: the header's metadata ([`GgufInfo`]) and one row of
//! the token-embedding table ([`token_embedding_row`]), read through llama.cpp's gguf reader.

use super::backend::{install_logger, path_to_cstring};
use super::Token;
use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::{CStr, CString};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::ptr::NonNull;

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
    let mut file = crate::store::fsutil::open_regular(path)
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
