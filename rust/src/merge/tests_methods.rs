//! IA3, LoHa and LoKr merges against a direct fp32 reference, and their exact unmerge.

use super::tests::{rand, write_st};
use super::*;
use crate::checkpoint::{Dtype, FloatType};

const ROWS: usize = 12;
const COLS: usize = 20;
const W: &str = "m.proj.weight";
const B: &str = "m.proj.bias";
const P: &str = "base_model.model.m.proj.";

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

struct Setup {
    _dir: tempfile::TempDir,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    w: Vec<f32>,
    bias: Vec<f32>,
}

/// A base with `m.proj` (out 12, in 20, stored as `dtype`) and its bias, and the adapters.
fn setup(dtype: Dtype, adapters: Vec<(&str, Tensors)>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let ft = FloatType::of(dtype).unwrap();
    // The values as stored, so the reference starts from what the kernel reads.
    let stored = |v: Vec<f32>| -> Vec<f32> {
        v.iter()
            .map(|x| ft.bits_to_f32(ft.round_bits(*x)))
            .collect()
    };
    let (w, bias) = (
        stored(rand(ROWS * COLS, 11, 0.5)),
        stored(rand(ROWS, 12, 0.5)),
    );
    write_st(
        &base.join("model.safetensors"),
        &[
            (W, dtype, vec![ROWS, COLS], w.clone()),
            (B, dtype, vec![ROWS], bias.clone()),
            ("norm.weight", Dtype::F32, vec![COLS], rand(COLS, 13, 1.0)),
        ],
    );
    let adapters = adapters
        .into_iter()
        .enumerate()
        .map(|(i, (config, tensors))| {
            let ad = dir.path().join(format!("ad{i}"));
            std::fs::create_dir_all(&ad).unwrap();
            let t: Vec<_> = tensors
                .iter()
                .map(|(n, s, v)| (n.as_str(), Dtype::F32, s.clone(), v.clone()))
                .collect();
            write_st(&ad.join("adapter_model.safetensors"), &t);
            std::fs::write(ad.join("adapter_config.json"), config).unwrap();
            ad
        })
        .collect();
    Setup {
        _dir: dir,
        base,
        adapters,
        w,
        bias,
    }
}

fn inputs(s: &Setup, weights: &[f64]) -> Vec<AdapterInput> {
    s.adapters
        .iter()
        .zip(weights)
        .map(|(d, &weight)| AdapterInput {
            dir: d.clone(),
            weights_file: d.join("adapter_model.safetensors"),
            weight,
        })
        .collect()
}

/// The message of the error that planning the merge of `s`'s one adapter (weight 1) raises.
fn plan_error(s: &Setup) -> String {
    let ck = Checkpoint::open(&s.base).unwrap();
    MergePlan::build(&ck, &inputs(s, &[1.0]), false)
        .err()
        .expect("the plan is refused")
        .to_string()
}

fn run_to(s: &Setup, from: &Path, name: &str, weights: &[f64], mode: Mode) -> Result<PathBuf> {
    Ok(run_report(s, from, name, weights, mode)?.0)
}

fn run_report(
    s: &Setup,
    from: &Path,
    name: &str,
    weights: &[f64],
    mode: Mode,
) -> Result<(PathBuf, Report)> {
    let out = s.base.parent().unwrap().join(name);
    std::fs::create_dir_all(&out).unwrap();
    let ck = Checkpoint::open(from)?;
    let unmerge = matches!(mode, Mode::Unmerge { .. });
    let plan = MergePlan::build(&ck, &inputs(s, weights), unmerge)?;
    let report = run(&ck, &plan, &out, &mode, &|_, _| true)?;
    Ok((out, report))
}

fn bits(dir: &Path, name: &str) -> Vec<u32> {
    let f = SafeTensorsFile::open(dir.join("model.safetensors")).unwrap();
    let t = f.require(name).unwrap();
    let ft = FloatType::of(t.dtype).unwrap();
    (0..t.numel()).map(|i| ft.load_bits(f.data(t), i)).collect()
}

/// `left @ right` with the kernel's (and BLAS's) FMA chain in k order.
fn matmul(left: &[f32], right: &[f32], r: usize, cols: usize) -> Vec<f32> {
    let rows = left.len() / r;
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] =
                (0..r).fold(0f32, |s, k| left[i * r + k].mul_add(right[k * cols + j], s));
        }
    }
    out
}

/// Merges with the sidecar, checks weight and bias against `want_w` / `want_b` (fp32 values
/// rounded once), then unmerges with the sidecar and checks the base comes back byte for byte.
fn check(s: &Setup, dtype: Dtype, weights: &[f64], want_w: &[f32], want_b: &[f32]) -> PathBuf {
    let ft = FloatType::of(dtype).unwrap();
    let (merged, report) = run_report(
        s,
        &s.base,
        "merged",
        weights,
        Mode::Merge {
            exact_unmerge: true,
            allow_nonfinite: false,
        },
    )
    .unwrap();
    // Half precision loses bits that only the sidecar gives back.
    assert!(dtype == Dtype::F32 || report.sidecar_elements > 0);
    for (name, want) in [(W, want_w), (B, want_b)] {
        let want: Vec<u32> = want.iter().map(|x| ft.round_bits(*x)).collect();
        assert_eq!(bits(&merged, name), want, "{name} ({dtype:?})");
    }
    let back = run_to(
        s,
        &merged,
        "back",
        weights,
        Mode::Unmerge {
            sidecar: Some(merged.join(SIDECAR_DIR)),
            expected: report.digests.clone(),
        },
    )
    .unwrap();
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(
        read(&s.base),
        read(&back),
        "unmerge with sidecar ({dtype:?})"
    );
    std::fs::remove_dir_all(&back).unwrap();
    merged
}

const DTYPES: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

#[test]
fn ia3_scales_rows_and_bias_or_feedforward_columns() {
    for dtype in DTYPES {
        // Non-feedforward: the output rows of W and the bias.
        let v: Vec<f32> = rand(ROWS, 21, 1.0).iter().map(|x| 1.0 + x).collect();
        let cfg = r#"{"peft_type":"IA3","feedforward_modules":["mlp.down"]}"#;
        let s = setup(
            dtype,
            vec![(cfg, vec![(format!("{P}ia3_l"), vec![ROWS, 1], v.clone())])],
        );
        let wt = 0.75f32;
        let want_w: Vec<f32> = (0..ROWS * COLS)
            .map(|e| s.w[e] * (v[e / COLS] * wt))
            .collect();
        let want_b: Vec<f32> = (0..ROWS).map(|i| s.bias[i] * (v[i] * wt)).collect();
        check(&s, dtype, &[wt as f64], &want_w, &want_b);

        // Feedforward (named by a regex): the input columns; the bias is left alone.
        let v: Vec<f32> = rand(COLS, 22, 1.0).iter().map(|x| 1.0 + x).collect();
        let cfg = r#"{"peft_type":"IA3","feedforward_modules":"m\\.pr.j"}"#;
        let s = setup(
            dtype,
            vec![(cfg, vec![(format!("{P}ia3_l"), vec![1, COLS], v.clone())])],
        );
        let want_w: Vec<f32> = (0..ROWS * COLS).map(|e| s.w[e] * v[e % COLS]).collect();
        check(&s, dtype, &[1.0], &want_w, &s.bias);
    }
}

#[test]
fn ia3_conv1d_layout_and_shape_disagreeing_with_config() {
    // fan_in_fan_out: W is stored (in, out) = (12, 20); a non-feedforward vector has out = 20
    // entries and scales W's columns and the bias (here 12 entries, so it must be refused).
    let v: Vec<f32> = rand(COLS, 23, 1.0).iter().map(|x| 1.0 + x).collect();
    let cfg = r#"{"peft_type":"IA3","fan_in_fan_out":true,"feedforward_modules":[]}"#;
    let s = setup(
        Dtype::F32,
        vec![(cfg, vec![(format!("{P}ia3_l"), vec![COLS, 1], v)])],
    );
    let e = run_to(
        &s,
        &s.base,
        "o",
        &[1.0],
        Mode::Merge {
            exact_unmerge: false,
            allow_nonfinite: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(B) && e.contains("ia3_l"), "{e}");

    let cfg = r#"{"peft_type":"IA3","feedforward_modules":["proj"]}"#;
    let s = setup(
        Dtype::F32,
        vec![(
            cfg,
            vec![(format!("{P}ia3_l"), vec![ROWS, 1], vec![1.0; ROWS])],
        )],
    );
    let e = plan_error(&s);
    assert!(
        e.contains("feedforward") && e.contains("[1, 20]") && e.contains(W),
        "{e}"
    );
}

#[test]
fn ia3_zero_factor_needs_the_sidecar() {
    let mut v: Vec<f32> = rand(ROWS, 24, 1.0).iter().map(|x| 1.0 + x).collect();
    v[3] = 0.0;
    let cfg = r#"{"peft_type":"IA3","feedforward_modules":[]}"#;
    let s = setup(
        Dtype::BF16,
        vec![(cfg, vec![(format!("{P}ia3_l"), vec![ROWS, 1], v.clone())])],
    );
    let want_w: Vec<f32> = (0..ROWS * COLS).map(|e| s.w[e] * v[e / COLS]).collect();
    let want_b: Vec<f32> = (0..ROWS).map(|i| s.bias[i] * v[i]).collect();
    let merged = check(&s, Dtype::BF16, &[1.0], &want_w, &want_b);
    let e = run_to(
        &s,
        &merged,
        "approx",
        &[1.0],
        Mode::Unmerge {
            sidecar: None,
            expected: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("zero") && e.contains("ia3_l"), "{e}");
    // Without zeros, the approximate unmerge divides.
    v[3] = 2.0;
    let s = setup(
        Dtype::F32,
        vec![(cfg, vec![(format!("{P}ia3_l"), vec![ROWS, 1], v.clone())])],
    );
    let merged = run_to(
        &s,
        &s.base,
        "m",
        &[1.0],
        Mode::Merge {
            exact_unmerge: false,
            allow_nonfinite: false,
        },
    )
    .unwrap();
    let back = run_to(
        &s,
        &merged,
        "b",
        &[1.0],
        Mode::Unmerge {
            sidecar: None,
            expected: None,
        },
    )
    .unwrap();
    let want: Vec<u32> = (0..ROWS * COLS)
        .map(|e| ((s.w[e] * v[e / COLS]) / v[e / COLS]).to_bits())
        .collect();
    assert_eq!(bits(&back, W), want);
}

/// LoHa factors of rank `r` for W and the reference delta (before scaling).
fn loha(r: usize, seed: u64) -> (Tensors, Vec<f32>) {
    let [w1a, w1b, w2a, w2b] = [
        rand(ROWS * r, seed, 1.0),
        rand(r * COLS, seed + 1, 1.0),
        rand(ROWS * r, seed + 2, 1.0),
        rand(r * COLS, seed + 3, 1.0),
    ];
    let (p1, p2) = (matmul(&w1a, &w1b, r, COLS), matmul(&w2a, &w2b, r, COLS));
    let prod = p1.iter().zip(&p2).map(|(a, b)| a * b).collect();
    let t = vec![
        (format!("{P}hada_w1_a"), vec![ROWS, r], w1a),
        (format!("{P}hada_w1_b"), vec![r, COLS], w1b),
        (format!("{P}hada_w2_a"), vec![ROWS, r], w2a),
        (format!("{P}hada_w2_b"), vec![r, COLS], w2b),
    ];
    (t, prod)
}

#[test]
fn loha_adds_the_scaled_hadamard_product() {
    for dtype in DTYPES {
        let (t, prod) = loha(3, 31);
        // The rank pattern gives this module r=3 and the alpha pattern alpha=1.5.
        let cfg = r#"{"peft_type":"LOHA","r":8,"alpha":16,"rank_pattern":{"proj":3},"alpha_pattern":{"m\\.proj":1.5}}"#;
        let s = setup(dtype, vec![(cfg, t)]);
        let scaling = (1.5f64 / 3.0 * -0.5) as f32;
        let want_w: Vec<f32> = (0..ROWS * COLS)
            .map(|e| s.w[e] + prod[e] * scaling)
            .collect();
        check(&s, dtype, &[-0.5], &want_w, &s.bias);
    }
    // A rank that the config does not give is refused.
    let (t, _) = loha(3, 31);
    let s = setup(
        Dtype::F32,
        vec![(r#"{"peft_type":"LOHA","r":4,"alpha":4}"#, t)],
    );
    let e = plan_error(&s);
    assert!(e.contains("hada_w1_a") && e.contains("r=4"), "{e}");
}

/// LoKr factors for W = (3*4, 4*5): w1 (3, 4), w2 (4, 5), each whole or of rank 2; and the
/// reference kron(w1, w2) before scaling.
fn lokr(w1_low_rank: bool, w2_low_rank: bool, seed: u64) -> (Tensors, Vec<f32>) {
    let mut t = Vec::new();
    let mut factor = |name: &str, (rows, cols): (usize, usize), low: bool, seed: u64| {
        if low {
            let (a, b) = (rand(rows * 2, seed, 1.0), rand(2 * cols, seed + 1, 1.0));
            let m = matmul(&a, &b, 2, cols);
            t.push((format!("{P}{name}_a"), vec![rows, 2], a));
            t.push((format!("{P}{name}_b"), vec![2, cols], b));
            m
        } else {
            let m = rand(rows * cols, seed, 1.0);
            t.push((format!("{P}{name}"), vec![rows, cols], m.clone()));
            m
        }
    };
    let w1 = factor("lokr_w1", (3, 4), w1_low_rank, seed);
    let w2 = factor("lokr_w2", (4, 5), w2_low_rank, seed + 2);
    let kron = (0..ROWS * COLS)
        .map(|e| {
            let (i, j) = (e / COLS, e % COLS);
            w1[(i / 4) * 4 + j / 5] * w2[(i % 4) * 5 + j % 5]
        })
        .collect();
    (t, kron)
}

#[test]
fn lokr_adds_the_scaled_kronecker_product() {
    for dtype in DTYPES {
        for (low1, low2) in [(false, false), (true, false), (false, true), (true, true)] {
            let (t, kron) = lokr(low1, low2, 41);
            let s = setup(dtype, vec![(r#"{"peft_type":"LOKR","r":2,"alpha":3}"#, t)]);
            let scaling = (3.0f64 / 2.0) as f32;
            let want_w: Vec<f32> = (0..ROWS * COLS)
                .map(|e| s.w[e] + kron[e] * scaling)
                .collect();
            check(&s, dtype, &[1.0], &want_w, &s.bias);
        }
    }
    // A factor that is stored whole and as a pair, and a kron of the wrong shape.
    let (mut t, _) = lokr(false, true, 41);
    t.push((format!("{P}lokr_w2"), vec![4, 5], vec![0.0; 20]));
    let s = setup(
        Dtype::F32,
        vec![(r#"{"peft_type":"LOKR","r":2,"alpha":3}"#, t)],
    );
    let e = plan_error(&s);
    assert!(e.contains("lokr_w2") && e.contains("both whole"), "{e}");
    let (mut t, _) = lokr(false, false, 41);
    t[1].1 = vec![5, 4];
    let s = setup(
        Dtype::F32,
        vec![(r#"{"peft_type":"LOKR","r":2,"alpha":3}"#, t)],
    );
    let e = plan_error(&s);
    assert!(e.contains("[15, 16]") && e.contains(W), "{e}");
}

#[test]
fn mixed_methods_apply_in_order() {
    for dtype in DTYPES {
        let v: Vec<f32> = rand(ROWS, 51, 1.0).iter().map(|x| 1.0 + x).collect();
        let (lokr_t, kron) = lokr(true, false, 52);
        let (loha_t, prod) = loha(2, 53);
        let (a, b) = (rand(2 * COLS, 54, 1.0), rand(ROWS * 2, 55, 1.0));
        let lora_t = vec![
            (format!("{P}lora_A.weight"), vec![2, COLS], a.clone()),
            (format!("{P}lora_B.weight"), vec![ROWS, 2], b.clone()),
        ];
        let ia3_t = vec![(format!("{P}ia3_l"), vec![ROWS, 1], v.clone())];
        let s = setup(
            dtype,
            vec![
                (r#"{"peft_type":"LORA","r":2,"lora_alpha":4}"#, lora_t),
                (r#"{"peft_type":"IA3","feedforward_modules":[]}"#, ia3_t),
                (r#"{"peft_type":"LOKR","r":2,"alpha":2}"#, lokr_t),
                (r#"{"peft_type":"LOHA","r":2,"alpha":1}"#, loha_t),
            ],
        );
        let ba = matmul(&b, &a, 2, COLS);
        let weights = [0.5, 1.0, 2.0, 1.0];
        let want_w: Vec<f32> = (0..ROWS * COLS)
            .map(|e| {
                let x = s.w[e] + ba[e] * (2.0f64 * 0.5) as f32;
                let x = x * v[e / COLS];
                let x = x + kron[e] * 2.0;
                x + prod[e] * 0.5
            })
            .collect();
        let want_b: Vec<f32> = (0..ROWS).map(|i| s.bias[i] * v[i]).collect();
        check(&s, dtype, &weights, &want_w, &want_b);
    }
}

#[test]
fn convolution_kernels_merge_as_their_2d_view_but_cp_cores_are_refused() {
    // A LoHa on a 4-D (conv) base weight.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    write_st(
        &base.join("model.safetensors"),
        &[("conv.weight", Dtype::F32, vec![4, 3, 2, 2], vec![0.5; 48])],
    );
    let ad = dir.path().join("ad");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type":"LOHA","r":2,"alpha":2}"#,
    )
    .unwrap();
    let p = "base_model.model.conv.";
    let mut t = vec![
        (
            format!("{p}hada_w1_a"),
            Dtype::F32,
            vec![4, 2],
            vec![0.1; 8],
        ),
        (
            format!("{p}hada_w1_b"),
            Dtype::F32,
            vec![2, 12],
            vec![0.1; 24],
        ),
        (
            format!("{p}hada_w2_a"),
            Dtype::F32,
            vec![4, 2],
            vec![0.1; 8],
        ),
        (
            format!("{p}hada_w2_b"),
            Dtype::F32,
            vec![2, 12],
            vec![0.1; 24],
        ),
    ];
    let build = |t: &[(String, Dtype, Vec<usize>, Vec<f32>)]| {
        let t: Vec<_> = t
            .iter()
            .map(|(n, d, s, v)| (n.as_str(), *d, s.clone(), v.clone()))
            .collect();
        write_st(&ad.join("adapter_model.safetensors"), &t);
        let ck = Checkpoint::open(&base).unwrap();
        let input = AdapterInput {
            dir: ad.clone(),
            weights_file: ad.join("adapter_model.safetensors"),
            weight: 1.0,
        };
        MergePlan::build(&ck, &[input], false).map_err(|e| e.to_string())
    };
    // Factors of the (4, 3 * 2 * 2) view: planned (tests/test_checkpoint_merge_conv.py checks the values).
    build(&t).unwrap();
    // use_effective_conv2d's CP core.
    t.push((
        format!("{p}hada_t1"),
        Dtype::F32,
        vec![2, 2, 2, 2],
        vec![0.1; 16],
    ));
    let e = build(&t).err().unwrap();
    assert!(
        e.contains("hada_t1") && e.contains("use_effective_conv2d"),
        "{e}"
    );
}
