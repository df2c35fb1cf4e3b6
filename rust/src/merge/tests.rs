use super::kernel;
use super::*;
use crate::checkpoint::{f32_to_bf16_bits, Dtype, FloatType, StreamingWriter, TensorSpec};

pub(super) fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let specs: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, _)| TensorSpec {
            name: n.to_string(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let mut w = StreamingWriter::create(path, None, &specs).unwrap();
    for (_, d, _, v) in tensors {
        let ft = FloatType::of(*d).unwrap();
        let mut b = vec![0u8; v.len() * ft.size()];
        v.iter()
            .enumerate()
            .for_each(|(i, x)| ft.store_bits(&mut b, i, ft.round_bits(*x)));
        w.write(&b).unwrap();
    }
    w.finish().unwrap();
}

pub(super) fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

#[test]
fn dots_match_sequential_fma_on_every_path() {
    // Column tails, more than one k block (64) and the register-block widths 16 and 32.
    for (r, cols) in [(5, 37), (16, 96), (70, 41), (130, 64), (16, 83)] {
        let left = rand(8 * r, 1, 2.0);
        let right = rand(r * cols, 2, 2.0);
        for nrows in 1..=8 {
            let mut out = vec![0f32; nrows * cols];
            kernel::dots(&left, &right, r, cols, nrows, 0.75, &mut out);
            for i in 0..nrows {
                for j in 0..cols {
                    let want = (0..r)
                        .fold(0f32, |s, k| left[i * r + k].mul_add(right[k * cols + j], s))
                        * 0.75;
                    assert_eq!(
                        out[i * cols + j].to_bits(),
                        want.to_bits(),
                        "r={r} cols={cols}"
                    );
                }
            }
        }
    }
}

struct Case {
    _dir: tempfile::TempDir,
    base: PathBuf,
    adapter: PathBuf,
}

/// A bf16 base with `m.proj` (out 9, in 21) and its bias, and an r=3 adapter with lora_bias.
fn case(config: &str, a_shape: [usize; 2], dora: bool) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let adapter = dir.path().join("ad");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&adapter).unwrap();
    write_st(
        &base.join("model.safetensors"),
        &[
            ("m.proj.weight", Dtype::BF16, vec![9, 21], rand(189, 3, 0.2)),
            ("m.proj.bias", Dtype::BF16, vec![9], rand(9, 4, 0.2)),
            ("norm.weight", Dtype::F32, vec![21], rand(21, 5, 1.0)),
        ],
    );
    let mut t = vec![
        (
            "base_model.model.m.proj.lora_A.weight",
            Dtype::F32,
            a_shape.to_vec(),
            rand(a_shape[0] * a_shape[1], 6, 1.0),
        ),
        (
            "base_model.model.m.proj.lora_B.weight",
            Dtype::F32,
            vec![9, 3],
            rand(27, 7, 1.0),
        ),
        (
            "base_model.model.m.proj.lora_B.bias",
            Dtype::F32,
            vec![9],
            rand(9, 8, 1.0),
        ),
    ];
    if dora {
        t.push((
            "base_model.model.m.proj.lora_magnitude_vector",
            Dtype::F32,
            vec![9],
            rand(9, 9, 1.0).iter().map(|x| x + 2.0).collect(),
        ));
    }
    write_st(&adapter.join("adapter_model.safetensors"), &t);
    std::fs::write(adapter.join("adapter_config.json"), config).unwrap();
    Case {
        _dir: dir,
        base,
        adapter,
    }
}

const CFG: &str = r#"{"peft_type":"LORA","r":3,"lora_alpha":6,"lora_bias":true}"#;

fn inputs(c: &Case, weight: f64) -> Vec<AdapterInput> {
    vec![AdapterInput {
        dir: c.adapter.clone(),
        weights_file: c.adapter.join("adapter_model.safetensors"),
        weight,
    }]
}

fn run_to(c: &Case, from: &Path, name: &str, mode: Mode) -> (PathBuf, Report) {
    let out = from.parent().unwrap().join(name);
    std::fs::create_dir_all(&out).unwrap();
    let ck = Checkpoint::open(from).unwrap();
    let plan =
        MergePlan::build(&ck, &inputs(c, 0.5), matches!(mode, Mode::Unmerge { .. })).unwrap();
    let rep = run(&ck, &plan, &out, &mode, &|_, _| true).unwrap();
    (out, rep)
}

#[test]
fn merge_is_single_rounding_and_unmerge_with_sidecar_is_exact() {
    let c = case(CFG, [3, 21], false);
    let (out, rep) = run_to(
        &c,
        &c.base,
        "merged",
        Mode::Merge {
            exact_unmerge: true,
            allow_nonfinite: false,
        },
    );
    assert_eq!((rep.tensors, rep.tensors_changed), (3, 2));
    let base = SafeTensorsFile::open(c.base.join("model.safetensors")).unwrap();
    let ad = SafeTensorsFile::open(c.adapter.join("adapter_model.safetensors")).unwrap();
    let merged = SafeTensorsFile::open(out.join("model.safetensors")).unwrap();
    let w = base
        .read_f32(base.require("m.proj.weight").unwrap())
        .unwrap();
    let a = ad
        .read_f32(ad.require("base_model.model.m.proj.lora_A.weight").unwrap())
        .unwrap();
    let b = ad
        .read_f32(ad.require("base_model.model.m.proj.lora_B.weight").unwrap())
        .unwrap();
    let got = merged.data(merged.require("m.proj.weight").unwrap());
    let s = (6.0f64 / 3.0 * 0.5) as f32;
    for i in 0..9 {
        for j in 0..21 {
            let dot = (0..3).fold(0f32, |acc, k| b[i * 3 + k].mul_add(a[k * 21 + j], acc));
            let want = f32_to_bf16_bits(w[i * 21 + j] + dot * s);
            assert_eq!(FloatType::BF16.load_bits(got, i * 21 + j), want as u32);
        }
    }
    assert_eq!(
        merged.data(merged.require("norm.weight").unwrap()),
        base.data(base.require("norm.weight").unwrap())
    );
    assert!(
        rep.sidecar_elements > 0,
        "a large delta must lose some bf16 bits"
    );

    let (restored, rep2) = run_to(
        &c,
        &out,
        "restored",
        Mode::Unmerge {
            sidecar: Some(out.join(SIDECAR_DIR)),
            expected: rep.digests.clone(),
        },
    );
    assert_eq!(rep2.sidecar_elements, rep.sidecar_elements);
    let bytes = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&c.base), bytes(&restored));
    let (approx, _) = run_to(
        &c,
        &out,
        "approx",
        Mode::Unmerge {
            sidecar: None,
            expected: None,
        },
    );
    let ap = SafeTensorsFile::open(approx.join("model.safetensors")).unwrap();
    let differing = (0..189)
        .filter(|&i| {
            FloatType::BF16.load_bits(ap.data(ap.require("m.proj.weight").unwrap()), i)
                != FloatType::BF16.load_bits(base.data(base.require("m.proj.weight").unwrap()), i)
        })
        .count();
    assert!(differing > 0);
}

#[test]
fn dora_unmerge_needs_and_uses_the_sidecar() {
    let cfg = r#"{"peft_type":"LORA","r":3,"lora_alpha":6,"use_dora":true,"lora_bias":true}"#;
    let c = case(cfg, [3, 21], true);
    let (out, _) = run_to(
        &c,
        &c.base,
        "merged",
        Mode::Merge {
            exact_unmerge: true,
            allow_nonfinite: false,
        },
    );
    let merged = Checkpoint::open(&out).unwrap();
    let plan = MergePlan::build(&merged, &inputs(&c, 0.5), true).unwrap();
    let e = run(
        &merged,
        &plan,
        &out,
        &Mode::Unmerge {
            sidecar: None,
            expected: None,
        },
        &|_, _| true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("DoRA") && e.contains("m.proj.weight"), "{e}");
    let (restored, _) = run_to(
        &c,
        &out,
        "restored",
        Mode::Unmerge {
            sidecar: Some(out.join(SIDECAR_DIR)),
            expected: None,
        },
    );
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(read(&c.base), read(&restored));
}

#[test]
fn plan_errors_name_both_tensors() {
    let c = case(CFG, [3, 20], false);
    let ck = Checkpoint::open(&c.base).unwrap();
    let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("'m.proj.weight'") && e.contains("[9, 21]"),
        "{e}"
    );
    let c = case(r#"{"peft_type":"BOFT"}"#, [3, 21], false);
    let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("BOFT") && e.contains("adapter_config.json"),
        "{e}"
    );
    // A LoRA file under an IA3 config is refused by tensor name.
    let c = case(r#"{"peft_type":"IA3"}"#, [3, 21], false);
    let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lora_A.weight") && e.contains("IA3"), "{e}");
    let c = case(
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8}"#,
        [3, 21],
        false,
    );
    let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("r=4"), "{e}");
}

#[test]
fn patterns_match_the_end_of_module_names() {
    let cfg: serde_json::Value = serde_json::from_str(
        r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":true,"rank_pattern":{"q_proj":4,"layers\\.1\\..*v_proj":2},"alpha_pattern":{"v_proj":3}}"#,
    )
    .unwrap();
    let s = AdapterSettings::from_json(&cfg).unwrap();
    assert_eq!(
        s.rank_and_scaling("model.layers.0.self_attn.q_proj"),
        (4, 16.0 / 2.0)
    );
    assert_eq!(
        s.rank_and_scaling("model.layers.1.self_attn.v_proj"),
        (2, 3.0 / 2f64.sqrt())
    );
    assert_eq!(
        s.rank_and_scaling("model.layers.0.self_attn.v_proj"),
        (8, 3.0 / 8f64.sqrt())
    );
    assert_eq!(
        s.rank_and_scaling("model.layers.0.self_attn.xq_proj"),
        (8, 16.0 / 8f64.sqrt())
    );
}

#[test]
fn a_huge_delta_keeps_the_original_instead_of_a_longer_fix_list() {
    for (cfg, dora) in [
        (CFG, false),
        (
            r#"{"peft_type":"LORA","r":3,"lora_alpha":6,"use_dora":true,"lora_bias":true}"#,
            true,
        ),
    ] {
        let c = case(cfg, [3, 21], dora);
        let out = c.base.parent().unwrap().join("merged");
        std::fs::create_dir_all(&out).unwrap();
        let ck = Checkpoint::open(&c.base).unwrap();
        let plan = MergePlan::build(&ck, &inputs(&c, 1e4), false).unwrap();
        let mode = Mode::Merge {
            exact_unmerge: true,
            allow_nonfinite: false,
        };
        let rep = run(&ck, &plan, &out, &mode, &|_, _| true).unwrap();
        let sc = SafeTensorsFile::open(out.join(SIDECAR_DIR).join("model.safetensors")).unwrap();
        let names: Vec<&str> = sc.tensors().iter().map(|t| t.name.as_str()).collect();
        assert!(
            names.contains(&"m.proj.weight.oxpeft_original"),
            "{names:?}"
        );
        assert!(!names
            .iter()
            .any(|n| n.starts_with("m.proj.weight.oxpeft_unmerge")));
        // The sidecar is never larger than the tensors it restores.
        assert!(rep.sidecar_bytes < 2 * (189 * 2 + 9 * 2) as u64 + 1024);

        let back = c.base.parent().unwrap().join("back");
        std::fs::create_dir_all(&back).unwrap();
        let merged = Checkpoint::open(&out).unwrap();
        let plan = MergePlan::build(&merged, &inputs(&c, 1e4), true).unwrap();
        let mode = Mode::Unmerge {
            sidecar: Some(out.join(SIDECAR_DIR)),
            expected: None,
        };
        run(&merged, &plan, &back, &mode, &|_, _| true).unwrap();
        let bytes = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
        assert_eq!(bytes(&c.base), bytes(&back));
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&back).unwrap();
    }
}

/// Sidecars written before format 2 (sorted u32 indices + original values as two tensors) still
/// give a bit-exact unmerge.
#[test]
fn a_format_1_sidecar_still_unmerges_exactly() {
    let c = case(CFG, [3, 21], false);
    let merge = Mode::Merge {
        exact_unmerge: true,
        allow_nonfinite: false,
    };
    let (out, rep) = run_to(&c, &c.base, "merged", merge);
    assert!(rep.sidecar_elements > 0);
    // Rewrite the sidecar in format 1.
    let path = out.join(SIDECAR_DIR).join("model.safetensors");
    let v2 = SafeTensorsFile::open(&path).unwrap();
    let base = SafeTensorsFile::open(c.base.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    for t in v2.tensors() {
        let Some(name) = t.name.strip_suffix(SUFFIX_FIXES) else {
            if !t.name.ends_with(SUFFIX_SEEK) {
                let spec = TensorSpec {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                };
                tensors.push((spec, v2.data(t).to_vec()));
            }
            continue;
        };
        let bt = base.require(name).unwrap();
        let ft = FloatType::of(bt.dtype).unwrap();
        let seek = v2.require(&format!("{name}{SUFFIX_SEEK}")).unwrap();
        let list = fixlist::FixList::new(ft, bt.numel() as u64, v2.data(t), v2.data(seek)).unwrap();
        let entries = list.entries();
        let index: Vec<u8> = entries
            .iter()
            .flat_map(|e| (e.0 as u32).to_le_bytes())
            .collect();
        let mut values = vec![0u8; entries.len() * ft.size()];
        entries
            .iter()
            .enumerate()
            .for_each(|(k, e)| ft.store_bits(&mut values, k, e.1));
        let spec = |suffix: &str, dtype| TensorSpec {
            name: format!("{name}{suffix}"),
            dtype,
            shape: vec![entries.len()],
        };
        tensors.push((spec(SUFFIX_INDEX, Dtype::U32), index));
        tensors.push((spec(SUFFIX_VALUE, bt.dtype), values));
    }
    drop(v2);
    let specs: Vec<TensorSpec> = tensors.iter().map(|t| t.0.clone()).collect();
    let mut w = StreamingWriter::create(&path, None, &specs).unwrap();
    tensors.iter().for_each(|t| w.write(&t.1).unwrap());
    w.finish().unwrap();

    let unmerge = Mode::Unmerge {
        sidecar: Some(out.join(SIDECAR_DIR)),
        expected: None,
    };
    let (restored, rep2) = run_to(&c, &out, "restored", unmerge);
    assert_eq!(rep2.sidecar_elements, rep.sidecar_elements);
    let bytes = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&c.base), bytes(&restored));
}

/// With the merge's digests an unmerge refuses a damaged sidecar before writing, and a changed
/// merged tensor or a restore that does not give the original back, naming the tensor.
#[test]
fn checked_unmerge_names_what_differs() {
    let c = case(CFG, [3, 21], false);
    let merge = Mode::Merge {
        exact_unmerge: true,
        allow_nonfinite: false,
    };
    let (out, rep) = run_to(&c, &c.base, "merged", merge);
    let digests = rep.digests.clone().expect("recorded with the sidecar");
    let unmerge = |from: &Path, weight: f64, expected: &Digests| -> String {
        let back = from.parent().unwrap().join("back");
        let _ = std::fs::remove_dir_all(&back);
        std::fs::create_dir_all(&back).unwrap();
        let ck = Checkpoint::open(from).unwrap();
        let plan = MergePlan::build(&ck, &inputs(&c, weight), true).unwrap();
        let mode = Mode::Unmerge {
            sidecar: Some(out.join(SIDECAR_DIR)),
            expected: Some(expected.clone()),
        };
        match run(&ck, &plan, &back, &mode, &|_, _| true) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(unmerge(&out, 0.5, &digests), "ok");
    // Other weights than the merge's: the restore is not the original.
    let e = unmerge(&out, 0.25, &digests);
    assert!(
        e.contains("m.proj.weight") && e.contains("differ from the original base"),
        "{e}"
    );
    // A merged element changed after the merge.
    let shard = out.join("model.safetensors");
    let pristine = std::fs::read(&shard).unwrap();
    let mut bytes = pristine.clone();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let e = unmerge(&out, 0.5, &digests);
    assert!(e.contains("changed after the merge"), "{e}");
    std::fs::write(&shard, &pristine).unwrap();
    // One flipped bit in the sidecar: refused before anything is read from it.
    let sc = out.join(SIDECAR_DIR).join("model.safetensors");
    let mut bytes = std::fs::read(&sc).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 4;
    std::fs::write(&sc, &bytes).unwrap();
    let e = unmerge(&out, 0.5, &digests);
    assert!(
        e.contains("oxpeft-unmerge/model.safetensors") && e.contains("changed or damaged"),
        "{e}"
    );
    std::fs::remove_file(&sc).unwrap();
    let e = unmerge(&out, 0.5, &digests);
    assert!(e.contains("is missing"), "{e}");
}

/// A merge whose result overflows the dtype is refused, naming the tensor and element, unless
/// allowed.
#[test]
fn nonfinite_merges_are_refused_unless_allowed() {
    let c = case(CFG, [3, 21], false);
    let ck = Checkpoint::open(&c.base).unwrap();
    let plan = MergePlan::build(&ck, &inputs(&c, 1e300), false).unwrap();
    let out = c.base.parent().unwrap().join("inf");
    std::fs::create_dir_all(&out).unwrap();
    let mode = |allow_nonfinite| Mode::Merge {
        exact_unmerge: false,
        allow_nonfinite,
    };
    let e = run(&ck, &plan, &out, &mode(false), &|_, _| true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.proj.weight")
            && e.contains("non-finite")
            && e.contains("allow_nonfinite=True"),
        "{e}"
    );
    run(&ck, &plan, &out, &mode(true), &|_, _| true).unwrap();
}
