//! Faults: a killed worker is named and ends the run with an error, never a
//! hang; bad checkpoints give errors naming the tensor, the file and the
//! shapes.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moe_runtime::model::init::StoreDtype;
use moe_runtime::model::reference::Reference;
use moe_runtime::model::weights::{names, Checkpoint, INDEX_FILE, SINGLE_FILE};
use moe_runtime::model::RuntimeError;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use support::*;

fn kill_one(role: &str, rank: usize) {
    let dir = TempDir::new(&format!("kill-{role}"));
    let model = checkpoint(dir.path(), "mixtral-mini", 3, 1, StoreDtype::Bf16);
    let model_s = model.display().to_string();
    let mut child = Command::new(MOE_RUN)
        .args([
            "--model",
            &model_s,
            "--attention",
            "2",
            "--experts",
            "2",
            "--microbatches",
            "2",
        ])
        .args([
            "--prompt-ids",
            "1,2,3",
            "--prompt-ids",
            "4,5",
            "--max-new-tokens",
            "100000",
        ])
        .env("M2N_WAIT", "yield")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the group has formed (the launcher says so), then let it
    // decode a while.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("workers joined the group") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "moe-run ended before the group formed"
        );
    }
    let needle = format!("--worker {role} --rank {rank}");
    let pid = pid_with(&model_s, &needle).expect("the worker runs");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let deadline = Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > deadline {
            let _ = child.kill();
            panic!("moe-run still running {deadline:?} after {role} {rank} was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let err = rest;
    assert!(!status.success(), "moe-run succeeded after losing a worker");
    assert!(
        err.contains(&format!("lost {role} {rank}: killed by signal 9")),
        "the launcher names the lost worker: {err}"
    );
    // Its peers name it too.
    assert!(err.contains(&format!("peer lost: {role} {rank}")), "{err}");
}

#[test]
fn a_killed_expert_worker_is_named_and_the_run_fails() {
    kill_one("expert", 1);
}

#[test]
fn a_killed_attention_worker_is_named_and_the_run_fails() {
    kill_one("attention", 0);
}

/// Rewrites a single-file checkpoint with `edit` applied to its tensors.
fn rewrite(model: &std::path::Path, edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
    let path = model.join(SINGLE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            let shape = edit(&n, v.shape().to_vec())?;
            Some((n, TensorView::new(v.dtype(), shape, v.data()).unwrap()))
        })
        .collect();
    let data = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, data).unwrap();
}

fn load_err(model: &std::path::Path) -> String {
    match Reference::load(model) {
        Ok(_) => panic!("a bad checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_name_the_tensor_file_and_shapes() {
    let dir = TempDir::new("badck");
    let w2 = names::expert(0, 3, "w2");

    // A missing tensor.
    let model = checkpoint(dir.path(), "tiny", 1, 1, StoreDtype::Bf16);
    rewrite(&model, |n, s| (n != w2).then_some(s));
    let err = load_err(&model);
    assert!(
        err.contains(&w2) && err.contains("missing") && err.contains(SINGLE_FILE),
        "{err}"
    );
    // An attention worker does not need expert tensors: it still loads.
    let ck = Checkpoint::open(&model).unwrap();
    let cfg = moe_runtime::model::load_config(&model).unwrap();
    moe_runtime::model::weights::AttentionWeights::load(&ck, &cfg).unwrap();

    // A mis-shaped tensor (same bytes, transposed shape).
    let cfg = moe_runtime::model::config_by_name("tiny").unwrap();
    let ffn_shape = format!("[{}, {}]", cfg.ffn, cfg.hidden);
    let model = checkpoint(dir.path(), "tiny", 3, 1, StoreDtype::Bf16);
    let w1 = names::expert(1, 2, "w1");
    rewrite(&model, |n, s| {
        Some(if n == w1 {
            s.into_iter().rev().collect()
        } else {
            s
        })
    });
    let err = load_err(&model);
    assert!(
        err.contains(&w1)
            && err.contains(SINGLE_FILE)
            && err.contains(&ffn_shape)
            && err.contains(&format!("[{}, {}]", cfg.hidden, cfg.ffn)),
        "names the tensor, the file and both shapes: {err}"
    );

    // A truncated file.
    let model = checkpoint(dir.path(), "tiny", 4, 1, StoreDtype::Bf16);
    let path = model.join(SINGLE_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = load_err(&model);
    assert!(
        err.contains(SINGLE_FILE) && err.contains("not a valid safetensors"),
        "{err}"
    );

    // A shard listed in the index that lacks the tensor.
    let model = checkpoint(dir.path(), "tiny", 5, 2, StoreDtype::Bf16);
    let idx_path = model.join(INDEX_FILE);
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove(names::LM_HEAD);
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let err = load_err(&model);
    assert!(
        err.contains(names::LM_HEAD) && err.contains(INDEX_FILE),
        "{err}"
    );

    // No checkpoint at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("config.json"), cfg.to_hf_config().to_string()).unwrap();
    let err = load_err(&empty);
    assert!(
        err.contains(SINGLE_FILE) && err.contains(INDEX_FILE),
        "{err}"
    );

    // The launcher reports it without starting anything wrong.
    let o = moe_run(
        &[
            "--model".into(),
            model.display().to_string(),
            "--prompt-ids".into(),
            "1".into(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains(names::LM_HEAD), "{}", stderr(&o));
}

#[test]
fn sharded_and_f32_checkpoints_give_the_same_model() {
    let dir = TempDir::new("formats");
    let mut outs: HashMap<String, Vec<(u32, f32)>> = HashMap::new();
    for (shards, dtype) in [
        (1, StoreDtype::Bf16),
        (3, StoreDtype::Bf16),
        (2, StoreDtype::F32),
    ] {
        let model = checkpoint(dir.path(), "tiny", 9, shards, dtype);
        if shards > 1 {
            assert!(model.join(INDEX_FILE).exists());
            assert!(!model.join(SINGLE_FILE).exists());
        }
        let r = Reference::load(&model).unwrap();
        outs.insert(
            format!("{shards} {dtype:?}"),
            r.generate(&[3, 1, 4, 1, 5], 10).unwrap(),
        );
    }
    let first = outs.values().next().unwrap().clone();
    for (k, v) in &outs {
        assert_eq!(v, &first, "{k}");
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let dir = TempDir::new("badreq");
    let model = checkpoint(dir.path(), "tiny", 1, 1, StoreDtype::Bf16);
    let m = model.display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--prompt-ids", "1,999"],
            "token id 999 is outside the vocabulary of 320",
        ),
        (&["--prompt-ids", "1,x"], "comma-separated token ids"),
        (
            &["--prompt-ids", "1", "--experts", "3"],
            "4 experts do not split evenly over 3",
        ),
        (
            &["--prompt-ids", "1", "--microbatches", "5"],
            "takes 1 to 4",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["--model".to_string(), m.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        let o = moe_run(&a, &[]);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let r = Reference::load(&model).unwrap();
    assert!(matches!(r.generate(&[], 3), Err(RuntimeError::Request(_))));
}

/// A checkpoint of a family the runtime does not run (or with an option
/// its family module does not implement) is refused before any worker
/// starts, naming the field; it used to be read as Mixtral.
#[test]
fn other_families_and_unsupported_options_are_refused() {
    let dir = TempDir::new("families");
    let model = checkpoint(dir.path(), "tiny", 5, 1, StoreDtype::Bf16);
    let config_path = model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let cases = [
        (
            "model_type",
            serde_json::json!("deepseek_v3"),
            "deepseek_v3",
        ),
        ("sliding_window", serde_json::json!(4096), "sliding_window"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 40.0}),
            "rope_scaling",
        ),
    ];
    for (field, value, named) in cases {
        let mut v = original.clone();
        v[field] = value;
        std::fs::write(&config_path, v.to_string()).unwrap();
        let o = moe_run(
            &[
                "--model".into(),
                model.display().to_string(),
                "--prompt-ids".into(),
                "1,2".into(),
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(2), "{field}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(named) && stderr(&o).contains("config.json"),
            "{field}: {}",
            stderr(&o)
        );
        let err = Reference::load(&model).unwrap_err().to_string();
        assert!(err.contains(named), "{field}: {err}");
    }
}

/// A checkpoint whose tensors are another family's than its config says
/// is refused naming the first tensor the family needs and lacks.
#[test]
fn a_checkpoint_missing_its_familys_tensors_names_them() {
    let dir = TempDir::new("family-tensors");
    let model = checkpoint(dir.path(), "tiny", 5, 1, StoreDtype::Bf16);
    let config_path = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    v["model_type"] = serde_json::json!("qwen3_moe");
    v["architectures"] = serde_json::json!(["Qwen3MoeForCausalLM"]);
    v["norm_topk_prob"] = serde_json::json!(true);
    std::fs::write(&config_path, v.to_string()).unwrap();
    let err = Reference::load(&model).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_norm.weight") && err.contains("missing"),
        "{err}"
    );
    let o = moe_run(
        &[
            "--model".into(),
            model.display().to_string(),
            "--prompt-ids".into(),
            "1,2".into(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("q_norm"), "{}", stderr(&o));
}

/// DeepSeek-V3: a config.json that no longer matches its checkpoint (one
/// more dense layer; a narrower latent) is refused naming the tensor that
/// is missing or mis-shaped.
#[test]
fn a_deepseek_checkpoint_that_does_not_match_its_config_names_the_tensor() {
    let dir = TempDir::new("deepseek-tensors");
    let model = checkpoint(dir.path(), "deepseek-v3-mini", 5, 1, StoreDtype::Bf16);
    let config_path = model.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    for (field, value, named, what) in [
        (
            "first_k_dense_replace",
            serde_json::json!(2),
            "model.layers.1.mlp.gate_proj.weight",
            "missing",
        ),
        (
            "kv_lora_rank",
            serde_json::json!(32),
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "shape",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[field] = value;
        std::fs::write(&config_path, v.to_string()).unwrap();
        let err = Reference::load(&model).unwrap_err().to_string();
        assert!(err.contains(named) && err.contains(what), "{field}: {err}");
    }
    std::fs::write(&config_path, original).unwrap();
    assert!(Reference::load(&model).is_ok());
}
