//! Offline merge and unmerge of LoRA, IA3, LoHa and LoKr adapters into safetensors checkpoints.
//!
//! [`MergePlan::build`] maps every adapter tensor to a base tensor and checks all shapes before
//! anything is written. [`run`] then streams each shard: untouched tensors are copied, changed
//! ones go through a fused kernel that applies the adapters in order to float(W) in fp32 (LoRA
//! adds `scaling * B @ A`, LoHa a Hadamard product of two low-rank products, LoKr a Kronecker
//! product, IA3 multiplies rows or columns) and rounds once, a few rows at a time, so no
//! full-size fp32 delta ever exists and the resident memory does not grow with the model. Rows
//! are processed in parallel (rayon), and so are shards. Only 2-D weights (Linear, Conv1D,
//! embeddings) are merged.
//!
//! Exact unmerge: while merging, the kernel also replays the unmerge of each element and records
//! the elements whose original bits would not come back (plus DoRA's per-row factors and the
//! originals of replaced tensors) in a sidecar; unmerging with it restores the base bit for bit.
//! The merge also records digests of every original and merged tensor, shard header and sidecar
//! file (see `digest`), and an unmerge given them proves its output equal to the original base
//! or fails, naming what differs.

mod digest;
mod fixlist;
mod half16;
mod kernel;
mod plan;
mod release;
mod shard;
mod sidecar;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_methods;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use digest::{Digests, ShardDigests, TensorDigests};
pub use plan::{AdapterSettings, MergePlan, Method};
use plan::{Op, TermKind};
use shard::{Context, ShardOut};

use crate::checkpoint::{Checkpoint, SafeTensorsFile};
use crate::{Error, Result};

/// Folder of the exact-unmerge sidecar inside a merged checkpoint. Serving tools that load every
/// `*.safetensors` of a checkpoint folder do not look into sub-folders.
pub const SIDECAR_DIR: &str = "oxpeft-unmerge";
const ADAPTER_PREFIX: &str = "base_model.model.";
/// Sidecar format 2: a tensor's fix-up records and their seek table (see `fixlist`).
const SUFFIX_FIXES: &str = ".oxpeft_unmerge_fixes";
const SUFFIX_SEEK: &str = ".oxpeft_unmerge_seek";
/// Sidecar format 1 (still read): sorted element indices (u32 or i64) and their original bits.
const SUFFIX_INDEX: &str = ".oxpeft_unmerge_index";
const SUFFIX_VALUE: &str = ".oxpeft_unmerge_value";
const SUFFIX_DORA: &str = ".oxpeft_dora_factor";
const SUFFIX_ORIGINAL: &str = ".oxpeft_original";
/// Output bytes per parallel task (a run of rows of one tensor): small enough to stay in cache
/// until written, large enough to keep the per-task overhead negligible.
#[cfg(not(test))]
const CHUNK_BYTES: usize = 1 << 20;
/// The unit tests use tiny tensors; a tiny chunk gives each of them several chunks.
#[cfg(test)]
const CHUNK_BYTES: usize = 256;
/// Shards whose final fsync (and sidecar) run at once, each on its own thread: they mostly wait
/// for the disk.
const FINISH_THREADS: usize = 16;
/// Rows computed together by the dot-product micro-kernel (they share each load of A).
const ROW_BLOCK: usize = 8;
/// DoRA adapters merged into one tensor at once (their row factors live on the kernel's stack).
const MAX_DORA_TERMS: usize = 8;

/// One adapter to merge: its folder (with `adapter_config.json`), its weights file (normally
/// `adapter_model.safetensors` in that folder) and its weight in the sum.

#[derive(Clone, Debug)]
pub struct AdapterInput {
    pub dir: PathBuf,
    pub weights_file: PathBuf,
    pub weight: f64,
}

/// What [`run`] does.
pub enum Mode {
    /// Merge, optionally recording the exact-unmerge sidecar (and the digests that check it).
    /// A merged element that is not finite where the base's was is an error unless
    /// `allow_nonfinite`.
    Merge {
        exact_unmerge: bool,
        allow_nonfinite: bool,
    },
    /// Unmerge; with the sidecar folder of the merged checkpoint the result is bit-exact, and
    /// with the merge's digests (`expected`) it is checked to be: the sidecar files and the
    /// merged shards' headers before anything is written, every tensor's merged and restored
    /// bytes as they stream.
    Unmerge {
        sidecar: Option<PathBuf>,
        expected: Option<Digests>,
    },
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub tensors_changed: usize,
    pub bytes: u64,
    /// Elements of the changed tensors.
    pub elements_changed: u64,
    /// Merge: elements recorded in the sidecar. Unmerge: elements restored from it.
    pub sidecar_elements: u64,
    pub sidecar_bytes: u64,
    /// Merge with the sidecar: the digests for its manifest.
    pub digests: Option<Digests>,
}

impl Report {
    fn add(&mut self, o: &Report) {
        self.tensors += o.tensors;
        self.tensors_changed += o.tensors_changed;
        self.bytes += o.bytes;
        self.elements_changed += o.elements_changed;
        self.sidecar_elements += o.sidecar_elements;
        self.sidecar_bytes += o.sidecar_bytes;
    }
}

/// Called after each tensor with its name and byte size; returning `false` cancels the run.
pub type Progress<'a> = &'a (dyn Fn(&str, u64) -> bool + Sync);

/// Writes every shard of `base`, with the plan applied, into the existing folder `out`, under the
/// base's shard names, tensor order, dtypes and metadata. Other files are the caller's business.
pub fn run(
    base: &Checkpoint,
    plan: &MergePlan,
    out: &Path,
    mode: &Mode,
    progress: Progress,
) -> Result<Report> {
    if let Mode::Unmerge {
        sidecar,
        expected: Some(expected),
    } = mode
    {
        let dir = sidecar.as_deref().ok_or_else(|| {
            Error::invalid_argument(
                "the merge's digests are checked with its sidecar, and none was given",
            )
        })?;
        verify_inputs(base, dir, expected)?;
    }
    let sidecars: HashMap<String, SafeTensorsFile> = match mode {
        Mode::Unmerge {
            sidecar: Some(dir), ..
        } => base
            .shards()
            .iter()
            .map(shard_name)
            .filter(|n| dir.join(n).is_file())
            .map(|n| {
                let f = SafeTensorsFile::open(dir.join(&n))?;
                Ok((n, f))
            })
            .collect::<Result<_>>()?,
        _ => HashMap::new(),
    };
    // Refuse before writing anything when an unmerge cannot be done.
    if let Mode::Unmerge { sidecar, .. } = mode {
        refuse_impossible_unmerge(base, plan, &sidecars, sidecar.as_deref())?;
    }
    let expect = match mode {
        Mode::Unmerge {
            expected: Some(e), ..
        } => Some(e.tensor_map()),
        _ => None,
    };
    let cx = Context { plan, mode, expect };
    if cx.recording() && !plan.ops.is_empty() {
        let dir = out.join(SIDECAR_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let shards = base
        .shards()
        .iter()
        .map(|shard| ShardOut::create(&cx, shard, sidecars.get(&shard_name(shard)), out))
        .collect::<Result<Vec<_>>>()?;
    // Every tensor of every shard is one task, biggest first so that the last ones are short.
    let mut tasks: Vec<(usize, usize)> = base
        .shards()
        .iter()
        .enumerate()
        .flat_map(|(si, s)| (0..s.tensors().len()).map(move |ti| (si, ti)))
        .collect();
    let size = |&(si, ti): &(usize, usize)| base.shards()[si].tensors()[ti].nbytes();
    tasks.sort_by_key(|task| std::cmp::Reverse(size(task)));
    let results = tasks
        .par_iter()
        .map(|&(si, ti)| {
            let done = shards[si].tensor(&cx, ti)?;
            let t = &base.shards()[si].tensors()[ti];
            if !progress(&t.name, t.nbytes() as u64) {
                return Err(Error::invalid_argument("cancelled"));
            }
            Ok(done)
        })
        .collect::<Result<Vec<(Report, TensorDigests)>>>()?;
    let mut total = Report::default();
    results.iter().for_each(|r| total.add(&r.0));
    // The shards' fsyncs and sidecars overlap, FINISH_THREADS shards at a time.
    let mut sidecar_files = Vec::with_capacity(shards.len());
    let mut shards = shards.into_iter().peekable();
    while shards.peek().is_some() {
        let group: Vec<ShardOut> = shards.by_ref().take(FINISH_THREADS).collect();
        sidecar_files.extend(std::thread::scope(|s| {
            let finishing: Vec<_> = group
                .into_iter()
                .map(|shard| s.spawn(move || shard.finish()))
                .collect();
            finishing
                .into_iter()
                .map(|h| h.join().expect("finishing a shard does not panic"))
                .collect::<Result<Vec<_>>>()
        })?);
    }
    let sidecar_files: Vec<(String, u64, u64)> = sidecar_files.into_iter().flatten().collect();
    total.sidecar_bytes += sidecar_files.iter().map(|f| f.1).sum::<u64>();
    if cx.recording() {
        let mut by_task: HashMap<(usize, usize), TensorDigests> = tasks
            .iter()
            .copied()
            .zip(results.iter().map(|r| r.1))
            .collect();
        let shards = base
            .shards()
            .iter()
            .enumerate()
            .map(|(si, s)| {
                let tensors = s
                    .tensors()
                    .iter()
                    .enumerate()
                    .map(|(ti, t)| {
                        (
                            t.name.clone(),
                            by_task.remove(&(si, ti)).expect("every task ran"),
                        )
                    })
                    .collect();
                let header = digest::of_header(s.raw_header());
                (shard_name(s), ShardDigests { header, tensors })
            })
            .collect();
        total.digests = Some(Digests {
            chunk_bytes: CHUNK_BYTES,
            shards,
            sidecar: sidecar_files,
        });
    }
    Ok(total)
}

/// Refuses an unmerge that needs sidecar entries it does not have: replaced tensors, DoRA, IA3
/// vectors with zeros.
fn refuse_impossible_unmerge(
    base: &Checkpoint,
    plan: &MergePlan,
    sidecars: &HashMap<String, SafeTensorsFile>,
    sidecar: Option<&Path>,
) -> Result<()> {
    for (key, op) in &plan.ops {
        let (shard, _) = base.get(key).expect("planned against base");
        let sc = sidecars.get(&shard_name(shard));
        if let (None, Op::Add(terms)) = (sc, op) {
            if let Some(vector) = terms.iter().find_map(|t| match &t.kind {
                TermKind::Scale {
                    vector, zero: true, ..
                } => Some(vector),
                _ => None,
            }) {
                return Err(Error::tensor(key, format!(
                    "was multiplied by IA3 vector '{vector}', which has zero entries: that cannot be \
                     undone without the exact-unmerge sidecar"
                )));
            }
        }
        let needs = match op {
            Op::Replace { .. } => Some(format!("{key}{SUFFIX_ORIGINAL}")),
            Op::Add(terms)
                if terms.iter().any(|t| {
                    matches!(
                        &t.kind,
                        TermKind::LowRank {
                            magnitude: Some(_),
                            ..
                        }
                    )
                }) =>
            {
                Some(format!("{key}{SUFFIX_DORA}"))
            }
            Op::Add(_) => None,
        };
        if let Some(needed) = needs {
            let original = format!("{key}{SUFFIX_ORIGINAL}");
            if sc
                .and_then(|f| f.get(&needed).or_else(|| f.get(&original)))
                .is_none()
            {
                let why = if matches!(op, Op::Replace { .. }) {
                    "was replaced by modules_to_save"
                } else {
                    "was merged with DoRA, whose norms"
                };
                return Err(Error::tensor(key, format!(
                    "{why} cannot be undone without the exact-unmerge sidecar ({}: missing '{needed}')",
                    sidecar.map_or("no sidecar given".to_string(), |d| d.display().to_string())
                )));
            }
        }
    }
    Ok(())
}

/// Before an unmerge writes anything: the sidecar folder holds exactly the files the merge wrote,
/// each with its recorded size and digest, and the merged checkpoint has exactly the merge's
/// shards, each with the header the merge wrote (so the same tensors, shapes, dtypes and places).
fn verify_inputs(base: &Checkpoint, dir: &Path, expected: &Digests) -> Result<()> {
    if expected.chunk_bytes != CHUNK_BYTES {
        return Err(Error::invalid_argument(format!(
            "{}: the sidecar's digests were computed over {}-byte chunks and this oxpeft uses {CHUNK_BYTES}: \
             unmerge with the oxpeft version that merged",
            dir.display(),
            expected.chunk_bytes
        )));
    }
    let recorded: HashMap<&str, (u64, u64)> = expected
        .sidecar
        .iter()
        .map(|(n, len, d)| (n.as_str(), (*len, *d)))
        .collect();
    let listing = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in listing {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !recorded.contains_key(name.as_str()) {
            return Err(Error::invalid_file(
                entry.path(),
                "is not a file the merge wrote into its sidecar (renamed, copied in from another merge?)",
            ));
        }
    }
    for (name, len, want) in &expected.sidecar {
        let path = dir.join(name);
        if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
            return Err(Error::invalid_file(
                dir.join("manifest.json"),
                format!(
                    "sidecar file name '{name}' is not a plain file name; the sidecar is damaged"
                ),
            ));
        }
        if !path.exists() {
            return Err(Error::invalid_file(
                &path,
                "is missing: the merge wrote it into the sidecar, and the unmerge needs it",
            ));
        }
        let (got_len, got) = digest::of_file(&path)?;
        if (got_len, got) != (*len, *want) {
            return Err(Error::invalid_file(
                &path,
                format!(
                    "differs from the sidecar file the merge wrote ({got_len} bytes with digest {}, recorded: \
                     {len} bytes with digest {}): the sidecar was changed or damaged",
                    digest::hex(got),
                    digest::hex(*want)
                ),
            ));
        }
    }
    let shards: HashMap<String, &SafeTensorsFile> =
        base.shards().iter().map(|s| (shard_name(s), s)).collect();
    let folder = base
        .shards()
        .first()
        .and_then(|s| s.path().parent())
        .unwrap_or(Path::new("."));
    for (name, sd) in &expected.shards {
        let Some(s) = shards.get(name) else {
            return Err(Error::invalid_file(
                folder.join(name),
                "is missing: the merge the sidecar belongs to wrote this shard",
            ));
        };
        if digest::of_header(s.raw_header()) != sd.header {
            return Err(Error::invalid_file(
                s.path(),
                "its header differs from the one the merge wrote (tensors added, removed, renamed, reshaped \
                 or moved): this is not the merged checkpoint the sidecar was written for",
            ));
        }
    }
    let listed: std::collections::HashSet<&str> =
        expected.shards.iter().map(|(n, _)| n.as_str()).collect();
    for (name, s) in &shards {
        if !listed.contains(name.as_str()) {
            return Err(Error::invalid_file(
                s.path(),
                "was not written by the merge the sidecar belongs to",
            ));
        }
    }
    Ok(())
}

fn shard_name(s: &SafeTensorsFile) -> String {
    s.path()
        .file_name()
        .expect("opened by name")
        .to_string_lossy()
        .into_owned()
}
