//! Python bindings of the illmrec runtime (the `illmrec._illmrec` extension module, wrapped by the
//! `illmrec` package). A thin front end: it converts Python values to the library's types and
//! back, releases the GIL while the model runs, and raises the runtime's errors as
//! `illmrec.IllmrecError` with the runtime's message. Scoring records come from
//! `illmrec::recommender::batch::score_user`, the function `illmrec score` uses, so both agree exactly.

use illmrec::engine::{self, ContextOptions, ModelOptions};
use illmrec::recommender::batch::{self, ScoreSettings};
use illmrec::recommender::{MissingImage, Options, Recommender as Inner};
use illmrec::store::jsonl::ScoreLine;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

pyo3::create_exception!(
    _illmrec,
    IllmrecError,
    PyRuntimeError,
    "An error of the illmrec runtime (bad bundle, unknown item id, empty history, ...)."
);

/// The runtime's error, with its whole cause chain on one line.
fn err(e: anyhow::Error) -> PyErr {
    IllmrecError::new_err(format!("{e:#}"))
}

/// A bundle opened once: the model (memory-mapped), heads, banks and catalog.
#[pyclass(module = "illmrec._illmrec")]
struct Recommender {
    inner: Mutex<Inner>,
    n_embd: usize,
    modalities: Vec<String>,
    trained: bool,
    item_ids: Vec<u64>,
}

impl Recommender {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic inside the runtime is a bug; the recommender stays usable for what follows.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl Recommender {
    /// Opens a bundle. The keyword options are the command line's runtime options.
    #[new]
    #[pyo3(signature = (bundle, *, model=None, threads=None, n_gpu_layers=None, mmap=true,
        mlock=false, ctx=2048, kv_f32=false, flash_attn="on", max_history=10,
        missing_image="text", description_tokens=64, cache_dir=None, prefix_cache=true,
        verbose=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bundle: PathBuf,
        model: Option<PathBuf>,
        threads: Option<i32>,
        n_gpu_layers: Option<i32>,
        mmap: bool,
        mlock: bool,
        ctx: u32,
        kv_f32: bool,
        flash_attn: &str,
        max_history: usize,
        missing_image: &str,
        description_tokens: usize,
        cache_dir: Option<PathBuf>,
        prefix_cache: bool,
        verbose: bool,
    ) -> PyResult<Self> {
        let flash_attn = match flash_attn {
            "auto" => None,
            "on" => Some(true),
            "off" => Some(false),
            other => {
                return Err(PyValueError::new_err(format!(
                    "flash_attn must be 'auto', 'on' or 'off', not {other:?}"
                )))
            }
        };
        let missing_image = match missing_image {
            "text" => MissingImage::Text,
            "title" => MissingImage::Title,
            other => {
                return Err(PyValueError::new_err(format!(
                    "missing_image must be 'text' or 'title', not {other:?}"
                )))
            }
        };
        let opts = Options {
            model,
            model_options: ModelOptions {
                n_gpu_layers: n_gpu_layers.unwrap_or_else(engine::default_gpu_layers),
                use_mmap: mmap,
                use_mlock: mlock,
                verbose,
            },
            context: ContextOptions {
                n_ctx: ctx,
                kv_f32,
                flash_attn,
                n_batch: 512,
                n_threads: threads.unwrap_or_else(engine::default_threads),
            },
            max_history,
            missing_image,
            description_tokens,
            cache_dir,
            reuse_prefix: prefix_cache,
            prompt_style: None,
        };
        let inner = py.detach(|| Inner::open(&bundle, opts)).map_err(err)?;
        Ok(Self {
            n_embd: inner.model().n_embd(),
            modalities: inner.modalities().iter().map(|m| m.to_string()).collect(),
            trained: inner.heads.config.trained,
            item_ids: inner.items.ids().to_vec(),
            inner: Mutex::new(inner),
        })
    }

    /// Width of the LLM's hidden state (the columns of `embed`).
    #[getter]
    fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// The scoring modalities, in the order of `embed(..., user_vectors=True)`'s blocks.
    #[getter]
    fn modalities(&self) -> Vec<String> {
        self.modalities.clone()
    }

    /// False when the bundle's heads are random (rankings are then meaningless).
    #[getter]
    fn trained(&self) -> bool {
        self.trained
    }

    /// The catalog's item ids, ascending.
    #[getter]
    fn item_ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_slice(py, &self.item_ids)
    }

    /// Problems met while opening that did not stop it (e.g. a rebuilt item-vector cache).
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.lock().warnings().to_vec()
    }

    /// The `top_k` best items for one history, over `candidates` or the whole catalog (history
    /// items excluded unless `include_seen`): (ids uint64, scores float32), best first.
    #[pyo3(signature = (history, top_k=10, candidates=None, include_seen=false))]
    fn recommend<'py>(
        &self,
        py: Python<'py>,
        history: Vec<u64>,
        top_k: usize,
        candidates: Option<Vec<u64>>,
        include_seen: bool,
    ) -> PyResult<(Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<f32>>)> {
        let line = ScoreLine {
            user: serde_json::Value::Null,
            history,
            candidates,
            top_k: Some(top_k),
        };
        let settings = ScoreSettings {
            top_k,
            include_seen,
        };
        let record = py
            .detach(|| batch::score_user(&mut self.lock(), &line, settings))
            .map_err(err)?;
        let ids: Vec<u64> = record.items.iter().map(|s| s.id).collect();
        let scores: Vec<f32> = record.items.iter().map(|s| s.score).collect();
        Ok((ids.into_pyarray(py), scores.into_pyarray(py)))
    }

    /// Scores `illmrec score` input records (dicts with "history" and optional "user",
    /// "candidates", "top_k") and returns its output records as dicts, in order. With
    /// errors="raise" the first bad record raises IllmrecError naming its index; with
    /// errors="return" it becomes {"user": ..., "error": message} and the others go on.
    #[pyo3(signature = (users, top_k=10, include_seen=false, errors="raise"))]
    fn score_batch<'py>(
        &self,
        py: Python<'py>,
        users: &Bound<'py, PyAny>,
        top_k: usize,
        include_seen: bool,
        errors: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        let raise = match errors {
            "raise" => true,
            "return" => false,
            other => {
                return Err(PyValueError::new_err(format!(
                    "errors must be 'raise' or 'return', not {other:?}"
                )))
            }
        };
        if top_k == 0 {
            return Err(PyValueError::new_err("top_k must be at least 1"));
        }
        let json = py.import("json")?;
        let dumps = json.getattr("dumps")?;
        // Every record as the JSON line `illmrec score` would read, parsed by the same code.
        let mut lines: Vec<(serde_json::Value, Result<ScoreLine, String>)> = Vec::new();
        for (i, u) in users.try_iter()?.enumerate() {
            let u = u?;
            let user = match u.cast::<PyDict>() {
                Ok(d) => match d.get_item("user")? {
                    Some(x) => serde_json::from_str(&dumps.call1((x,))?.extract::<String>()?)
                        .unwrap_or(serde_json::Value::Null),
                    None => serde_json::Value::Null,
                },
                Err(_) => serde_json::Value::Null,
            };
            let parsed = match dumps.call1((&u,)) {
                Ok(text) => {
                    serde_json::from_str::<ScoreLine>(&text.extract::<String>()?).map_err(|e| {
                        format!("not a valid user record (needs \"history\": [ids]): {e}")
                    })
                }
                Err(e) => Err(format!("not JSON-serialisable: {e}")),
            };
            if raise {
                if let Err(e) = &parsed {
                    return Err(IllmrecError::new_err(format!("users[{i}]: {e}")));
                }
            }
            lines.push((user, parsed));
        }
        let settings = ScoreSettings {
            top_k,
            include_seen,
        };
        let results: Vec<Result<String, String>> = py.detach(|| {
            let mut rec = self.lock();
            let mut out = Vec::with_capacity(lines.len());
            for (user, line) in &lines {
                let r = match line {
                    Ok(l) => batch::score_user(&mut rec, l, settings)
                        .and_then(|r| Ok(serde_json::to_string(&r)?))
                        .map_err(|e| format!("{e:#}")),
                    Err(e) => Err(e.clone()),
                };
                let failed = r.is_err();
                out.push(r.map_err(|e| match raise {
                    true => e,
                    false => serde_json::json!({"error": e, "user": user}).to_string(),
                }));
                if failed && raise {
                    break;
                }
            }
            out
        });
        let loads = json.getattr("loads")?;
        let list = PyList::empty(py);
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(text) => list.append(loads.call1((text,))?)?,
                Err(e) if raise => return Err(IllmrecError::new_err(format!("users[{i}]: {e}"))),
                Err(text) => list.append(loads.call1((text,))?)?,
            }
        }
        Ok(list)
    }

    /// The LLM's final hidden state at `[REC]` for each history: float32 [len(histories),
    /// n_embd], as `illmrec embed` writes. With user_vectors=True also the user vectors
    /// f_u_m(h) of every modality, concatenated: (hidden, user).
    #[pyo3(signature = (histories, user_vectors=false))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        histories: Vec<Vec<u64>>,
        user_vectors: bool,
    ) -> PyResult<Py<PyAny>> {
        let n = histories.len();
        let (hidden, user) = py
            .detach(|| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
                let mut rec = self.lock();
                let (mut hidden, mut user) = (Vec::new(), Vec::new());
                for (i, h) in histories.iter().enumerate() {
                    let u = rec
                        .encode_user(h)
                        .map_err(|e| anyhow::Error::new(e).context(format!("histories[{i}]")))?;
                    hidden.extend_from_slice(&u.hidden);
                    if user_vectors {
                        user.extend(u.vectors.concat());
                    }
                }
                Ok((hidden, user))
            })
            .map_err(err)?;
        let matrix = |flat: Vec<f32>| -> PyResult<Bound<'py, PyArray2<f32>>> {
            let cols = if n == 0 { 0 } else { flat.len() / n };
            let a = Array2::from_shape_vec((n, cols), flat)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            Ok(a.into_pyarray(py))
        };
        let hidden = if n == 0 {
            Array2::<f32>::zeros((0, self.n_embd)).into_pyarray(py)
        } else {
            matrix(hidden)?
        };
        Ok(match user_vectors {
            false => hidden.into_any().unbind(),
            true => (hidden, matrix(user)?)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Recommender({} items, modalities {:?}, n_embd {}, trained {})",
            self.item_ids.len(),
            self.modalities,
            self.n_embd,
            self.trained
        )
    }
}

#[pymodule]
fn _illmrec(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Recommender>()?;
    m.add("IllmrecError", m.py().get_type::<IllmrecError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
