//! The engine on the real default model (Gemma 3 270M, f32): embedding injection is
//! equivalent to the token it replaces, prefix reuse equals a fresh prefill, and prompts decoded
//! together equal each decoded alone.

mod common;

use common::{cosine, max_abs, max_abs_diff};
use illmrec::engine::{
    token_embedding_row, Context, ContextOptions, GgufInfo, Input, Model, ModelOptions,
};
use std::sync::Arc;

fn model() -> Arc<Model> {
    Arc::new(
        Model::load(
            &common::model_path(),
            &ModelOptions {
                n_gpu_layers: 0,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn context(model: &Arc<Model>) -> Context {
    Context::new(
        model.clone(),
        &ContextOptions {
            n_ctx: 512,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn gguf_metadata_of_the_default_model() {
    let info = GgufInfo::read(&common::model_path()).unwrap();
    assert_eq!((info.architecture.as_str(), info.n_embd), ("gemma3", 640));
    assert!((info.input_scale() - 640f32.sqrt()).abs() < 1e-6);
}

#[test]
fn injected_token_row_equals_the_token() {
    let model = model();
    let path = common::model_path();
    let scale = model.info.input_scale();
    let text = model
        .tokenize("The capital of France is a city called", true)
        .unwrap();
    let dog = model.tokenize(" dog", false).unwrap();
    assert_eq!(dog.len(), 1);
    let row: Vec<f32> = token_embedding_row(&path, dog[0])
        .unwrap()
        .iter()
        .map(|v| v * scale)
        .collect();
    let raw_row = token_embedding_row(&path, dog[0]).unwrap();
    let mut ctx = context(&model);

    // At the last position (the [REC] slot of a prompt).
    let mut as_token: Vec<Input> = text.iter().map(|&t| Input::Token(t)).collect();
    as_token.push(Input::Token(dog[0]));
    let mut as_vector: Vec<Input> = text.iter().map(|&t| Input::Token(t)).collect();
    as_vector.push(Input::Embedding(&row));
    let h_token = ctx.last_hidden(&as_token, false).unwrap();
    let h_vector = ctx.last_hidden(&as_vector, false).unwrap();
    assert_eq!(h_token.len(), 640);
    let d = max_abs_diff(&h_token, &h_vector);
    println!("last position: max abs diff {d}");
    assert!(d <= 1e-3, "last position: max abs diff {d}");

    // In the middle of a batch that mixes tokens and a vector (a visual-token slot).
    let tail = model.tokenize(" runs in the park", false).unwrap();
    let mid = |x: Input<'_>| -> Vec<f32> {
        let mut inputs: Vec<Input> = text.iter().map(|&t| Input::Token(t)).collect();
        inputs.push(x);
        inputs.extend(tail.iter().map(|&t| Input::Token(t)));
        context(&model).last_hidden(&inputs, false).unwrap()
    };
    let (m_token, m_vector) = (mid(Input::Token(dog[0])), mid(Input::Embedding(&row)));
    let d = max_abs_diff(&m_token, &m_vector);
    println!("middle position: max abs diff {d}");
    assert!(d <= 1e-3, "middle position: max abs diff {d}");

    // Control: without the model's input scale the vector is a different input.
    let mut unscaled: Vec<Input> = text.iter().map(|&t| Input::Token(t)).collect();
    unscaled.push(Input::Embedding(&raw_row));
    let h_unscaled = ctx.last_hidden(&unscaled, false).unwrap();
    println!("unscaled row: cos {}", cosine(&h_token, &h_unscaled));
    assert!(
        cosine(&h_token, &h_unscaled) < 0.9,
        "an unscaled row must not pass for the token"
    );
}

#[test]
fn prefix_reuse_equals_a_fresh_prefill() {
    let model = model();
    let prefix = model
        .tokenize(
            "Your job is to recommend a suitable next item based on a user's interacted items.",
            true,
        )
        .unwrap();
    let vector = illmrec_test_vector();
    let mut inputs: Vec<Input> = prefix.iter().map(|&t| Input::Token(t)).collect();
    let suffix = model
        .tokenize(
            " This user liked {Title: Heat (1995), Visual representation: ",
            false,
        )
        .unwrap();
    inputs.extend(suffix.iter().map(|&t| Input::Token(t)));
    inputs.push(Input::Embedding(&vector));
    inputs.push(Input::Embedding(&vector));

    let mut ctx = context(&model);
    ctx.set_prefix(&prefix).unwrap();
    assert_eq!(ctx.shared_prefix_len(&inputs), prefix.len());
    let reused = ctx.last_hidden(&inputs, true).unwrap();
    let reused_again = ctx.last_hidden(&inputs, true).unwrap();
    let fresh = ctx.last_hidden(&inputs, false).unwrap();
    assert_eq!(
        reused, reused_again,
        "a request leaves the cache as it found it"
    );
    // The same batches, but the fresh prefix's KV cells sit elsewhere in the cache: with flash
    // attention off the attention sums run over the whole cache (other sequences masked), so a
    // different cell layout changes the summation order and nothing else.
    println!(
        "reused vs fresh prefix: cos {}, max abs diff {}",
        cosine(&reused, &fresh),
        max_abs_diff(&reused, &fresh)
    );
    assert!(
        max_abs_diff(&reused, &fresh) <= 1e-3 * max_abs(&fresh),
        "reusing the cached prefix must equal recomputing it in the same batches to float rounding: max abs diff {}",
        max_abs_diff(&reused, &fresh)
    );

    // A context that never cached anything decodes everything in one batch. llama.cpp's results
    // depend on batch shapes (GEMM tiles, summation order), so this is close, not equal: on the
    // f32 default model to float rounding (on Q4_K_M, whose activations are quantized per row,
    // cos 0.9989 was measured).
    let one_batch = context(&model).last_hidden(&inputs, false).unwrap();
    println!(
        "one batch vs prefix + rest: cos {}, max abs diff {}",
        cosine(&reused, &one_batch),
        max_abs_diff(&reused, &one_batch)
    );
    assert!(
        cosine(&reused, &one_batch) > 0.9999,
        "cos {}",
        cosine(&reused, &one_batch)
    );

    // A different request on the same context is unaffected by the one before.
    let other: Vec<Input> = model
        .tokenize("Something else entirely", true)
        .unwrap()
        .into_iter()
        .map(Input::Token)
        .collect();
    let a = ctx.last_hidden(&other, true).unwrap();
    let mut new_ctx = context(&model);
    new_ctx.set_prefix(&prefix).unwrap();
    assert_eq!(a, new_ctx.last_hidden(&other, true).unwrap());
}

#[test]
fn several_prompts_decoded_together_equal_each_alone() {
    let model = model();
    let prefix = model
        .tokenize(
            "Your job is to recommend a suitable next item based on a user's interacted items.",
            true,
        )
        .unwrap();
    let vector = illmrec_test_vector();
    let titles = [
        " This user liked {Title: Heat (1995), Visual representation: ",
        " This user liked {Title: Toy Story (1995), Visual representation: ",
        " This user liked {Title: Fargo (1996), Visual representation: ",
    ];
    let mut requests: Vec<Vec<Input>> = titles
        .iter()
        .map(|t| {
            let mut inputs: Vec<Input> = prefix.iter().map(|&t| Input::Token(t)).collect();
            inputs.extend(
                model
                    .tokenize(t, false)
                    .unwrap()
                    .into_iter()
                    .map(Input::Token),
            );
            inputs.push(Input::Embedding(&vector));
            inputs
        })
        .collect();
    // One request that does not start with the cached prefix.
    requests.push(
        model
            .tokenize("Something else entirely", true)
            .unwrap()
            .into_iter()
            .map(Input::Token)
            .collect(),
    );
    let slices: Vec<&[Input]> = requests.iter().map(Vec::as_slice).collect();
    let mut ctx = context(&model);
    ctx.set_prefix(&prefix).unwrap();
    let alone: Vec<Vec<f32>> = slices
        .iter()
        .map(|r| ctx.last_hidden(r, true).unwrap())
        .collect();
    let together = ctx.many_hidden(&slices, true).unwrap();
    assert_eq!(together.len(), slices.len());
    for (k, (a, t)) in alone.iter().zip(&together).enumerate() {
        println!(
            "request {k}: cos {}, max abs diff {} of {}",
            cosine(a, t),
            max_abs_diff(a, t),
            max_abs(a)
        );
        assert!(
            max_abs_diff(a, t) <= 1e-3 * max_abs(a) && cosine(a, t) > 0.9999,
            "request {k} decoded with others differs from alone: max abs diff {}",
            max_abs_diff(a, t)
        );
    }
    // Distinct requests give distinct states (not one state copied to every output).
    assert!(max_abs_diff(&together[0], &together[1]) > 1e-2);
    // The cache is left as found: a request alone afterwards gives the same state as before.
    assert_eq!(ctx.last_hidden(slices[0], true).unwrap(), alone[0]);
    // Too many positions for the context together: an error, not an abort; then still usable.
    let many: Vec<&[Input]> = std::iter::repeat_n(slices[0], 16).collect();
    let err = ctx.many_hidden(&many, false).unwrap_err().to_string();
    assert!(err.contains("raise --ctx"), "{err}");
    assert!(ctx.many_hidden(&[], true).is_err());
    assert_eq!(ctx.many_hidden(&slices[..1], false).unwrap().len(), 1);
}

fn illmrec_test_vector() -> Vec<f32> {
    common::seeded(5, 640).iter().map(|v| v * 20.0).collect()
}

#[test]
fn hidden_states_do_not_depend_on_the_thread_count() {
    // 513 positions: calls of 512 would leave the image vector alone in a second call attending
    // over 768 cells, where ggml's CPU flash attention splits the cells across threads; the
    // runtime cuts 511 + 2 instead. Flash attention on (the default) and off.
    let model = model();
    let vector = illmrec_test_vector();
    let text = "{Title: Heat (1995), Visual representation: }, ".repeat(60);
    let mut inputs: Vec<Input> = model
        .tokenize(&text, true)
        .unwrap()
        .into_iter()
        .take(512)
        .map(Input::Token)
        .collect();
    assert_eq!(inputs.len(), 512);
    inputs.push(Input::Embedding(&vector));
    for flash_attn in [Some(true), Some(false)] {
        let states: Vec<Vec<f32>> = [1, 2, 3]
            .iter()
            .map(|&n_threads| {
                let opts = ContextOptions {
                    n_ctx: 1024,
                    n_threads,
                    flash_attn,
                    ..Default::default()
                };
                let mut ctx = Context::new(model.clone(), &opts).unwrap();
                ctx.last_hidden(&inputs, false).unwrap()
            })
            .collect();
        // Byte-identical where illmrec's kernels run (AVX-512); ggml's own kernels split work by
        // thread count, so elsewhere equal within 3e-3 of the largest value.
        let exact = illmrec::engine::kernels::install() == illmrec::engine::kernels::State::On;
        for (k, s) in states.iter().enumerate().skip(1) {
            let diff = max_abs_diff(s, &states[0]);
            if exact {
                assert_eq!(
                    s,
                    &states[0],
                    "flash attention {flash_attn:?}: {} threads against 1: max abs diff {diff}",
                    k + 1
                );
            } else {
                assert!(
                    diff / max_abs(&states[0]) < 3e-3,
                    "flash attention {flash_attn:?}: {} threads against 1: max abs diff {diff}",
                    k + 1
                );
            }
        }
    }
}

#[test]
fn contexts_on_several_threads_equal_each_alone() {
    // Four contexts of one model decoding at the same time on four threads (as `serve
    // --contexts 4` does, here with 1, 1, 2 and 3 threads each: one-thread products may overlap,
    // the others run alone): each state must equal the same request decoded with nothing else
    // running. Prompts are long enough for the BLAS backend (32+ positions), whose thread count
    // is process-wide in OpenBLAS.
    let model = model();
    let prompts: Vec<Vec<Input>> = [
        "{Title: Heat (1995), Visual representation: }, ",
        "{Title: Toy Story (1995), Visual representation: }, ",
        "{Title: Fargo (1996), Visual representation: }, ",
        "{Title: Casino (1995), Visual representation: }, ",
    ]
    .iter()
    .map(|t| {
        model
            .tokenize(&t.repeat(12), true)
            .unwrap()
            .into_iter()
            .map(Input::Token)
            .collect()
    })
    .collect();
    let opts = |k: usize| ContextOptions {
        n_ctx: 512,
        n_threads: [1, 1, 2, 3][k],
        ..Default::default()
    };
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .enumerate()
        .map(|(k, p)| {
            Context::new(model.clone(), &opts(k))
                .unwrap()
                .last_hidden(p, false)
                .unwrap()
        })
        .collect();
    std::thread::scope(|scope| {
        for (k, prompt) in prompts.iter().enumerate() {
            let (model, opts, alone) = (model.clone(), opts(k), &alone);
            scope.spawn(move || {
                let mut ctx = Context::new(model, &opts).unwrap();
                for round in 0..8 {
                    let state = ctx.last_hidden(prompt, false).unwrap();
                    assert!(
                        state == alone[k],
                        "prompt {k}, round {round}: max abs diff {} against alone",
                        max_abs_diff(&state, &alone[k])
                    );
                }
            });
        }
    });
}

#[test]
fn bad_inputs_are_errors_not_aborts() {
    let model = model();
    let mut ctx = context(&model);
    let short = vec![0.0f32; 10];
    let err = ctx
        .last_hidden(&[Input::Token(2), Input::Embedding(&short)], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_embd is 640"), "{err}");
    let err = ctx
        .last_hidden(&[Input::Token(-3)], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let nan = vec![f32::NAN; 640];
    let err = ctx
        .last_hidden(&[Input::Embedding(&nan)], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN"), "{err}");
    let long: Vec<Input> = (0..600).map(|_| Input::Token(100)).collect();
    let err = ctx.last_hidden(&long, false).unwrap_err().to_string();
    assert!(err.contains("does not fit the context"), "{err}");
    assert!(ctx.last_hidden(&[], false).is_err());
    // The context still works afterwards.
    assert_eq!(
        ctx.last_hidden(&[Input::Token(2), Input::Token(818)], false)
            .unwrap()
            .len(),
        640
    );
}

#[test]
fn non_gguf_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"this is not a model").unwrap();
    let err = Model::load(&path, &ModelOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a GGUF"), "{err}");
    let mut bytes = std::fs::read(common::model_path()).unwrap();
    bytes.truncate(4096);
    std::fs::write(&path, bytes).unwrap();
    let err = Model::load(&path, &ModelOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("GGUF"), "{err}");
}
