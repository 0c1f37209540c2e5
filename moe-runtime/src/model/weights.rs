//! Weights from safetensors checkpoints with Hugging Face's Mixtral tensor
//! names: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; a worker reads
//! only the tensors of its role, so an attention worker never touches an
//! expert's pages and the reverse. bf16 and f32 tensors load as bf16.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::bf16;
use kernels::cpu::ffn::Expert;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::tensors::{self, tensor_specs, Proj, TensorSpec};

/// A shared expert every token goes through, scaled by
/// `sigmoid(gate . x)` (Qwen2-MoE); held by the attention workers.
#[derive(Debug)]
pub struct SharedExpert {
    pub expert: Expert,
    /// `hidden`.
    pub gate: Vec<bf16>,
}
use super::{ModelConfig, RuntimeError};

pub use super::tensors::{names, INDEX_FILE, SINGLE_FILE};

/// One mapped file with its parsed header.
#[derive(Debug)]
struct Mapped {
    map: Mmap,
    header: usize,
    meta: Metadata,
}

/// A checkpoint directory: which file holds each tensor, with files mapped
/// on first use.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// Tensor name to file name, from the index (sharded checkpoints).
    index: Option<BTreeMap<String, String>>,
    files: Mutex<HashMap<String, Arc<Mapped>>>,
}

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` when present, else
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, RuntimeError> {
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| RuntimeError::Checkpoint {
                    file: index_path.clone(),
                    detail: e.to_string(),
                })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| RuntimeError::Checkpoint {
                    file: index_path.clone(),
                    detail: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| RuntimeError::Checkpoint {
                    file: index_path.clone(),
                    detail: "no \"weight_map\" object".into(),
                })?;
            let mut out = BTreeMap::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| RuntimeError::Checkpoint {
                    file: index_path.clone(),
                    detail: format!("weight_map[{k:?}] is not a file name"),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(RuntimeError::Checkpoint {
                        file: index_path.clone(),
                        detail: format!("weight_map[{k:?}] = {f:?} leaves the directory"),
                    });
                }
                out.insert(k.clone(), f.to_string());
            }
            Some(out)
        } else if dir.join(SINGLE_FILE).exists() {
            None
        } else {
            return Err(RuntimeError::Checkpoint {
                file: dir.to_path_buf(),
                detail: format!("neither {INDEX_FILE} nor {SINGLE_FILE} is there"),
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            files: Mutex::new(HashMap::new()),
        })
    }

    fn file_of(&self, name: &str) -> Result<String, RuntimeError> {
        match &self.index {
            None => Ok(SINGLE_FILE.to_string()),
            Some(idx) => idx
                .get(name)
                .cloned()
                .ok_or_else(|| RuntimeError::MissingTensor {
                    tensor: name.into(),
                    file: self.dir.join(INDEX_FILE),
                }),
        }
    }

    fn mapped(&self, file: &str) -> Result<Arc<Mapped>, RuntimeError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = files.get(file) {
            return Ok(m.clone());
        }
        let path = self.dir.join(file);
        let err = |detail: String| RuntimeError::Checkpoint {
            file: path.clone(),
            detail,
        };
        let f = File::open(&path).map_err(|e| err(e.to_string()))?;
        // SAFETY: the file is mapped read-only; a checkpoint is not modified
        // while it is being served (as with every mmap-based loader).
        let map = unsafe { Mmap::map(&f) }.map_err(|e| err(e.to_string()))?;
        let (header, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
        let m = Arc::new(Mapped { map, header, meta });
        files.insert(file.to_string(), m.clone());
        Ok(m)
    }

    /// Checks that every tensor of `c` is there with its shape and a
    /// supported dtype, from the headers alone (nothing is read).
    pub fn verify(&self, c: &ModelConfig) -> Result<(), RuntimeError> {
        for TensorSpec { name, shape, .. } in tensor_specs(c) {
            let (path, m) = self.locate(&name)?;
            let info = m.meta.info(&name).expect("located");
            if info.shape != shape {
                return Err(RuntimeError::TensorShape {
                    tensor: name,
                    file: path,
                    expected: shape,
                    found: info.shape.clone(),
                });
            }
            if !matches!(info.dtype, Dtype::BF16 | Dtype::F32) {
                return Err(RuntimeError::Checkpoint {
                    file: path,
                    detail: format!(
                        "{name}: dtype {:?} is not supported (bf16 or f32)",
                        info.dtype
                    ),
                });
            }
        }
        Ok(())
    }

    /// The file holding `name`, mapped.
    fn locate(&self, name: &str) -> Result<(PathBuf, Arc<Mapped>), RuntimeError> {
        let file = self.file_of(name)?;
        let m = self.mapped(&file)?;
        let path = self.dir.join(&file);
        if m.meta.info(name).is_none() {
            return Err(RuntimeError::MissingTensor {
                tensor: name.into(),
                file: path,
            });
        }
        Ok((path, m))
    }

    /// Tensor `name` as bf16 (converted from f32 when stored so), checked
    /// against `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>, RuntimeError> {
        let file = self.file_of(name)?;
        let m = self.mapped(&file)?;
        let path = self.dir.join(&file);
        let info = m
            .meta
            .info(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                tensor: name.into(),
                file: path.clone(),
            })?;
        if info.shape != shape {
            return Err(RuntimeError::TensorShape {
                tensor: name.into(),
                file: path,
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (a, b) = info.data_offsets;
        let start = 8 + m.header;
        let bytes = &m.map[start + a..start + b];
        let n: usize = shape.iter().product();
        match info.dtype {
            Dtype::BF16 if bytes.len() == 2 * n => Ok(bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()),
            Dtype::F32 if bytes.len() == 4 * n => Ok(bytes
                .chunks_exact(4)
                .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()),
            other => Err(RuntimeError::Checkpoint {
                file: path,
                detail: format!("{name}: dtype {other:?} is not supported (bf16 or f32)"),
            }),
        }
    }
}

/// One layer's attention-side weights.
#[derive(Debug)]
pub struct AttentionLayer {
    pub input_norm: Vec<bf16>,
    /// `heads * head_dim x hidden`.
    pub q: Vec<bf16>,
    /// `kv_heads * head_dim x hidden`.
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    /// `hidden x heads * head_dim`.
    pub o: Vec<bf16>,
    /// Per-head RMSNorm weights of the queries and keys (`head_dim`), in
    /// the families that have them.
    pub q_norm: Option<Vec<bf16>>,
    pub k_norm: Option<Vec<bf16>>,
    /// Query, key and value biases, in the families that have them.
    pub qkv_bias: Option<[Vec<bf16>; 3]>,
    pub shared: Option<SharedExpert>,
    pub post_norm: Vec<bf16>,
    /// The router, `experts x hidden`.
    pub gate: Vec<bf16>,
}

/// Everything an attention worker holds: embeddings, every layer's
/// attention and router, the final norm and the LM head.
#[derive(Debug)]
pub struct AttentionWeights {
    /// `vocab x hidden`.
    pub embed: Vec<bf16>,
    /// The router renormalises the chosen experts' weights.
    pub norm_topk: bool,
    pub layers: Vec<AttentionLayer>,
    pub norm: Vec<bf16>,
    /// `vocab x hidden`.
    pub lm_head: Vec<bf16>,
}

impl AttentionWeights {
    pub fn load(ck: &Checkpoint, c: &ModelConfig) -> Result<Self, RuntimeError> {
        let (h, v) = (c.hidden as usize, c.vocab as usize);
        let (q, kv) = (
            (c.heads * c.head_dim) as usize,
            (c.kv_heads * c.head_dim) as usize,
        );
        let layers = (0..c.layers as usize)
            .map(|i| {
                let t = |rest: &str, shape: &[usize]| ck.tensor(&names::layer(i, rest), shape);
                let (q_norm, k_norm) = match tensors::qk_norms(c, i) {
                    Some([(qn, ql), (kn, kl)]) => {
                        (Some(ck.tensor(&qn, &[ql])?), Some(ck.tensor(&kn, &[kl])?))
                    }
                    None => (None, None),
                };
                let qkv_bias = match tensors::qkv_biases(c, i) {
                    Some([(qn, ql), (kn, kl), (vn, vl)]) => Some([
                        ck.tensor(&qn, &[ql])?,
                        ck.tensor(&kn, &[kl])?,
                        ck.tensor(&vn, &[vl])?,
                    ]),
                    None => None,
                };
                let shared = if c.family.shared_expert() {
                    let s = c.shared_ffn as usize;
                    let gate = ck.tensor(&tensors::shared_expert(i, Proj::Gate), &[s, h])?;
                    let up = ck.tensor(&tensors::shared_expert(i, Proj::Up), &[s, h])?;
                    let down = ck.tensor(&tensors::shared_expert(i, Proj::Down), &[h, s])?;
                    Some(SharedExpert {
                        expert: Expert::new(h, s, gate, up, down),
                        gate: ck.tensor(&tensors::shared_expert_gate(i), &[1, h])?,
                    })
                } else {
                    None
                };
                Ok(AttentionLayer {
                    qkv_bias,
                    shared,
                    input_norm: t("input_layernorm.weight", &[h])?,
                    q: t("self_attn.q_proj.weight", &[q, h])?,
                    k: t("self_attn.k_proj.weight", &[kv, h])?,
                    v: t("self_attn.v_proj.weight", &[kv, h])?,
                    o: t("self_attn.o_proj.weight", &[h, q])?,
                    q_norm,
                    k_norm,
                    post_norm: t("post_attention_layernorm.weight", &[h])?,
                    gate: ck.tensor(&tensors::router(c.family, i), &[c.experts as usize, h])?,
                })
            })
            .collect::<Result<_, RuntimeError>>()?;
        Ok(Self {
            embed: ck.tensor(names::EMBED, &[v, h])?,
            norm_topk: c.norm_topk,
            layers,
            norm: ck.tensor(names::NORM, &[h])?,
            lm_head: ck.tensor(names::LM_HEAD, &[v, h])?,
        })
    }
}

/// The experts `first..first + count` of every layer: `layers[l][j]` is
/// expert `first + j` of layer `l`.
#[derive(Debug)]
pub struct ExpertWeights {
    pub first: usize,
    pub layers: Vec<Vec<Expert>>,
}

impl ExpertWeights {
    pub fn load(
        ck: &Checkpoint,
        c: &ModelConfig,
        first: usize,
        count: usize,
    ) -> Result<Self, RuntimeError> {
        let (h, f) = (c.hidden as usize, c.ffn as usize);
        let layers = (0..c.layers as usize)
            .map(|i| {
                (first..first + count)
                    .map(|j| {
                        let name = |p| tensors::expert(c.family, i, j, p);
                        let gate = ck.tensor(&name(Proj::Gate), &[f, h])?;
                        let down = ck.tensor(&name(Proj::Down), &[h, f])?;
                        let up = ck.tensor(&name(Proj::Up), &[f, h])?;
                        Ok(Expert::new(h, f, gate, up, down))
                    })
                    .collect::<Result<Vec<_>, RuntimeError>>()
            })
            .collect::<Result<_, RuntimeError>>()?;
        Ok(Self { first, layers })
    }
}
