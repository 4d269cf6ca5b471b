//! Checkpoint heads: shapes are checked, and the Rust MLPs match an f64 computation.

mod common;

use illmrec::method::heads::{random_tensors, write_safetensors, Heads, HeadsConfig, WeightDtype};
use safetensors::SafeTensors;
use std::collections::HashMap;

fn config() -> HeadsConfig {
    serde_json::from_str(&common::heads_config(64)).unwrap()
}

/// Tensors as read back from the file, in f64.
fn read_f64(path: &std::path::Path) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                safetensors::Dtype::BF16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                d => panic!("{d:?}"),
            };
            (name, vals)
        })
        .collect()
}

fn linear64(t: &HashMap<String, Vec<f64>>, name: &str, x: &[f64]) -> Vec<f64> {
    let (w, b) = (&t[&format!("{name}.weight")], &t[&format!("{name}.bias")]);
    b.iter()
        .enumerate()
        .map(|(o, bo)| bo + (0..x.len()).map(|i| w[o * x.len() + i] * x[i]).sum::<f64>())
        .collect()
}

fn layer_norm64(t: &HashMap<String, Vec<f64>>, name: &str, x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let (w, b) = (&t[&format!("{name}.weight")], &t[&format!("{name}.bias")]);
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) / (var + eps).sqrt() * w[i] + b[i])
        .collect()
}

fn head64(t: &HashMap<String, Vec<f64>>, prefix: &str, x: &[f64]) -> Vec<f64> {
    let h = linear64(t, &format!("{prefix}.mlp.0"), x);
    let h: Vec<f64> = layer_norm64(t, &format!("{prefix}.mlp.1"), &h, 1e-5)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    linear64(t, &format!("{prefix}.mlp.3"), &h)
}

fn adaptor64(t: &HashMap<String, Vec<f64>>, x: &[f64]) -> Vec<f64> {
    let h = linear64(t, "adaptor.proj_v2c", x);
    let h: Vec<f64> = layer_norm64(t, "adaptor.layernorm", &h, 1e-8)
        .into_iter()
        .map(|v| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)))
        .collect();
    linear64(t, "adaptor.interface", &h)
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum::<f64>()
        .sqrt();
    num / want.iter().map(|b| b * b).sum::<f64>().sqrt()
}

#[test]
fn mlps_match_an_f64_computation_for_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    std::fs::write(
        dir.path().join("heads.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &random_tensors(&cfg, 11).unwrap(), dtype).unwrap();
        let heads = Heads::load(&path, &dir.path().join("heads.json")).unwrap();
        let t = read_f64(&path);
        for seed in 0..5 {
            let h = common::seeded(100 + seed, 64);
            let h64: Vec<f64> = h.iter().map(|v| *v as f64 * 4.0).collect();
            let h: Vec<f32> = h.iter().map(|v| v * 4.0).collect();
            for m in heads.modalities() {
                let err = rel_err(
                    &heads.user[&m].forward(&h),
                    &head64(&t, &format!("f_u_{m}"), &h64),
                );
                assert!(err < 1e-5, "f_u_{m} {dtype:?}: relative error {err}");
                let x = common::seeded(200 + seed, cfg.item_dim(m).unwrap());
                let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
                let err = rel_err(
                    &heads.item[&m].forward(&x),
                    &head64(&t, &format!("f_i_{m}"), &x64),
                );
                assert!(err < 1e-5, "f_i_{m} {dtype:?}: relative error {err}");
                let batched = heads.item[&m].forward_rows(&[x.clone(), x.clone()].concat());
                assert_eq!(
                    &batched[..cfg.proj_dim],
                    &heads.item[&m].forward(&x)[..],
                    "batched rows equal single rows"
                );
            }
            let x = common::seeded(300 + seed, common::IMG_DIM);
            let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let err = rel_err(
                &heads.adaptor.as_ref().unwrap().forward(&x),
                &adaptor64(&t, &x64),
            );
            assert!(err < 1e-5, "adaptor {dtype:?}: relative error {err}");
        }
        assert_eq!(heads.rec_token.len(), 64);
    }
}

#[test]
fn a_wrong_shape_is_refused_naming_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    std::fs::write(
        dir.path().join("heads.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let mut tensors = random_tensors(&cfg, 1).unwrap();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "f_i_text.mlp.0.weight")
        .unwrap();
    t.1 = vec![64, 20];
    t.2.truncate(64 * 20);
    let path = dir.path().join("bad.safetensors");
    write_safetensors(&path, &tensors, WeightDtype::F32).unwrap();
    let err = Heads::load(&path, &dir.path().join("heads.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("'f_i_text.mlp.0.weight' has shape [64, 20], expected [64, 24]"),
        "{err}"
    );

    let mut tensors = random_tensors(&cfg, 1).unwrap();
    tensors.retain(|t| t.0 != "rec_token");
    write_safetensors(&path, &tensors, WeightDtype::F32).unwrap();
    let err = Heads::load(&path, &dir.path().join("heads.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("'rec_token' is missing"), "{err}");
}

#[test]
fn any_subset_of_modalities_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.item_dims.retain(|k, _| k == "text");
    cfg.prompt = illmrec::method::prompt::PromptStyle::Title;
    std::fs::write(
        dir.path().join("heads.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let path = dir.path().join("t.safetensors");
    write_safetensors(&path, &random_tensors(&cfg, 2).unwrap(), WeightDtype::Bf16).unwrap();
    let heads = Heads::load(&path, &dir.path().join("heads.json")).unwrap();
    assert_eq!(
        heads.modalities(),
        vec![illmrec::store::bank::Modality::Text]
    );
    assert!(heads.adaptor.is_none());
}
