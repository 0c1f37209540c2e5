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
/// `sigmoid(gate . x)` where it has a gate (Qwen2-MoE; DeepSeek-V3's is
/// not gated); held by the attention workers.
#[derive(Debug)]
pub struct SharedExpert {
    pub expert: Expert,
    /// `hidden`.
    pub gate: Option<Vec<bf16>>,
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
        self.with_bytes(name, shape, |dtype, bytes| match dtype {
            Dtype::BF16 => Some(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            Dtype::F32 => Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            _ => None,
        })
    }

    /// Tensor `name` as f32 (for the few kept in f32, such as DeepSeek's
    /// score-correction bias), checked against `shape`.
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, RuntimeError> {
        self.with_bytes(name, shape, |dtype, bytes| match dtype {
            Dtype::BF16 => Some(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            Dtype::F32 => Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            _ => None,
        })
    }

    /// `convert` on the stored bytes of tensor `name`, checked against
    /// `shape`; `convert` returns `None` for a dtype it does not read.
    fn with_bytes<T>(
        &self,
        name: &str,
        shape: &[usize],
        convert: impl FnOnce(Dtype, &[u8]) -> Option<T>,
    ) -> Result<T, RuntimeError> {
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
        let whole = match info.dtype {
            Dtype::BF16 => bytes.len() == 2 * n,
            Dtype::F32 => bytes.len() == 4 * n,
            _ => false,
        };
        whole
            .then(|| convert(info.dtype, bytes))
            .flatten()
            .ok_or_else(|| RuntimeError::Checkpoint {
                file: path,
                detail: format!(
                    "{name}: dtype {:?} is not supported (bf16 or f32)",
                    info.dtype
                ),
            })
    }
}

/// Self-attention's projections (besides the output projection).
#[derive(Debug)]
pub enum SelfAttn {
    /// Grouped-query attention: `q` is `heads * head_dim x hidden`, `k`
    /// and `v` are `kv_heads * head_dim x hidden`.
    Gqa {
        q: Vec<bf16>,
        k: Vec<bf16>,
        v: Vec<bf16>,
    },
    /// Multi-head latent attention (DeepSeek-V3).
    Mla(MlaWeights),
}

/// Multi-head latent attention's weights and rope (see
/// [`super::config::Mla`] for the sizes).
#[derive(Debug)]
pub struct MlaWeights {
    pub dims: super::config::Mla,
    /// `q_a_proj` (`q_lora_rank x hidden`) and `q_a_layernorm`, when the
    /// queries go through a low-rank pair.
    pub q_a: Option<(Vec<bf16>, Vec<bf16>)>,
    /// `q_b_proj` (or `q_proj`): `heads * qk_head_dim x (q_lora_rank or
    /// hidden)`.
    pub q_b: Vec<bf16>,
    /// `kv_a_proj_with_mqa`: `kv_lora_rank + qk_rope_head_dim x hidden`.
    pub kv_a: Vec<bf16>,
    /// `kv_a_layernorm`: `kv_lora_rank`.
    pub kv_a_norm: Vec<bf16>,
    /// `kv_b_proj`: per head, `qk_nope_head_dim` key rows then
    /// `v_head_dim` value rows, each `kv_lora_rank` wide.
    pub kv_b: Vec<bf16>,
    /// Rope's inverse frequencies (`qk_rope_head_dim / 2`, YaRN-scaled
    /// where the config says so) and the factor on cos and sin.
    pub inv_freq: Vec<f32>,
    pub rope_factor: f32,
    /// The softmax's scale: `qk_head_dim^-1/2`, times YaRN's mscale^2.
    pub softmax_scale: f32,
}

impl MlaWeights {
    fn load(
        ck: &Checkpoint,
        c: &ModelConfig,
        m: &super::config::Mla,
        i: usize,
    ) -> Result<Self, RuntimeError> {
        use tensors::mla;
        let (h, heads) = (c.hidden as usize, c.heads as usize);
        let (ql, kvl) = (m.q_lora_rank as usize, m.kv_lora_rank as usize);
        let (qk, rope) = (m.qk_head_dim() as usize, m.qk_rope_head_dim as usize);
        let (nope, vd) = (m.qk_nope_head_dim as usize, m.v_head_dim as usize);
        let (q_a, q_b) = if ql > 0 {
            let a = ck.tensor(&mla::q_a(i), &[ql, h])?;
            let norm = ck.tensor(&mla::q_a_norm(i), &[ql])?;
            (Some((a, norm)), ck.tensor(&mla::q_b(i), &[heads * qk, ql])?)
        } else {
            (None, ck.tensor(&mla::q(i), &[heads * qk, h])?)
        };
        let (inv_freq, rope_factor, mscale) = match &c.yarn {
            Some(y) => (
                y.inv_freq(rope, c.rope_theta)
                    .into_iter()
                    .map(|f| f as f32)
                    .collect(),
                y.attention_factor() as f32,
                y.softmax_scale(),
            ),
            None => (
                (0..rope / 2)
                    .map(|j| 1.0 / (c.rope_theta as f32).powf((2 * j) as f32 / rope as f32))
                    .collect(),
                1.0,
                1.0,
            ),
        };
        Ok(Self {
            dims: m.clone(),
            q_a,
            q_b,
            kv_a: ck.tensor(&mla::kv_a(i), &[kvl + rope, h])?,
            kv_a_norm: ck.tensor(&mla::kv_a_norm(i), &[kvl])?,
            kv_b: ck.tensor(&mla::kv_b(i), &[heads * (nope + vd), kvl])?,
            inv_freq,
            rope_factor,
            softmax_scale: ((qk as f64).powf(-0.5) * mscale) as f32,
        })
    }
}

/// One layer's attention-side weights.
#[derive(Debug)]
pub struct AttentionLayer {
    pub input_norm: Vec<bf16>,
    pub attn: SelfAttn,
    /// `hidden x heads * head_dim` (MLA: `heads * v_head_dim`).
    pub o: Vec<bf16>,
    /// RMSNorm weights of the queries and keys, in the families that
    /// have them (per head, or over the whole projection).
    pub q_norm: Option<Vec<bf16>>,
    pub k_norm: Option<Vec<bf16>>,
    /// Query, key and value biases, in the families that have them.
    pub qkv_bias: Option<[Vec<bf16>; 3]>,
    pub post_norm: Vec<bf16>,
    /// The router, `experts x hidden` (empty in a dense layer).
    pub gate: Vec<bf16>,
    /// The router's score-correction bias (DeepSeek-V3), `experts`.
    pub score_bias: Option<Vec<f32>>,
    pub shared: Option<SharedExpert>,
    /// A dense layer's MLP, instead of experts (run here, no M2N round).
    pub dense: Option<Expert>,
}

/// How the routers choose (the same for every layer of a model).
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    /// The chosen experts' weights are renormalised to sum to one.
    pub norm_topk: bool,
    /// DeepSeek-V3's group-limited sigmoid router: groups, best groups,
    /// and the weights' scale.
    pub groups: usize,
    pub topk_groups: usize,
    pub scale: f32,
}

/// Everything an attention worker holds: embeddings, every layer's
/// attention and router (or dense MLP), the final norm and the LM head.
#[derive(Debug)]
pub struct AttentionWeights {
    /// `vocab x hidden`.
    pub embed: Vec<bf16>,
    pub routing: Routing,
    pub layers: Vec<AttentionLayer>,
    pub norm: Vec<bf16>,
    /// `vocab x hidden`.
    pub lm_head: Vec<bf16>,
}

impl AttentionLayer {
    fn load(ck: &Checkpoint, c: &ModelConfig, i: usize) -> Result<Self, RuntimeError> {
        let (h, e) = (c.hidden as usize, c.experts as usize);
        let (q, kv) = (
            (c.heads * c.head_dim) as usize,
            (c.kv_heads * c.head_dim) as usize,
        );
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
        let (attn, o) = match &c.mla {
            Some(m) => (
                SelfAttn::Mla(MlaWeights::load(ck, c, m, i)?),
                ck.tensor(&tensors::mla::o(i), &[h, (c.heads * m.v_head_dim) as usize])?,
            ),
            None => (
                SelfAttn::Gqa {
                    q: t("self_attn.q_proj.weight", &[q, h])?,
                    k: t("self_attn.k_proj.weight", &[kv, h])?,
                    v: t("self_attn.v_proj.weight", &[kv, h])?,
                },
                t("self_attn.o_proj.weight", &[h, q])?,
            ),
        };
        let mlp = |name: &dyn Fn(Proj) -> String, f: usize| -> Result<Expert, RuntimeError> {
            let gate = ck.tensor(&name(Proj::Gate), &[f, h])?;
            let up = ck.tensor(&name(Proj::Up), &[f, h])?;
            let down = ck.tensor(&name(Proj::Down), &[h, f])?;
            Ok(Expert::new(h, f, gate, up, down))
        };
        let mut layer = AttentionLayer {
            input_norm: t("input_layernorm.weight", &[h])?,
            attn,
            o,
            q_norm,
            k_norm,
            qkv_bias,
            post_norm: t("post_attention_layernorm.weight", &[h])?,
            gate: Vec::new(),
            score_bias: None,
            shared: None,
            dense: None,
        };
        if c.is_dense(i) {
            layer.dense = Some(mlp(&|p| tensors::dense_mlp(i, p), c.dense_ffn as usize)?);
            return Ok(layer);
        }
        layer.gate = ck.tensor(&tensors::router(c.family, i), &[e, h])?;
        if c.family.router_bias() {
            layer.score_bias = Some(ck.tensor_f32(&tensors::router_bias(i), &[e])?);
        }
        if c.family.shared_expert() && c.shared_ffn > 0 {
            let expert = mlp(
                &|p| tensors::shared_expert(c.family, i, p),
                c.shared_ffn as usize,
            )?;
            let gate = if c.family.shared_expert_gate() {
                Some(ck.tensor(&tensors::shared_expert_gate(i), &[1, h])?)
            } else {
                None
            };
            layer.shared = Some(SharedExpert { expert, gate });
        }
        Ok(layer)
    }
}

impl AttentionWeights {
    pub fn load(ck: &Checkpoint, c: &ModelConfig) -> Result<Self, RuntimeError> {
        let (h, v) = (c.hidden as usize, c.vocab as usize);
        let layers = (0..c.layers as usize)
            .map(|i| AttentionLayer::load(ck, c, i))
            .collect::<Result<_, RuntimeError>>()?;
        Ok(Self {
            embed: ck.tensor(names::EMBED, &[v, h])?,
            routing: Routing {
                norm_topk: c.norm_topk,
                groups: c.n_group as usize,
                topk_groups: c.topk_group as usize,
                scale: c.routed_scaling as f32,
            },
            layers,
            norm: ck.tensor(names::NORM, &[h])?,
            lm_head: ck.tensor(names::LM_HEAD, &[v, h])?,
        })
    }
}

/// The experts `first..first + count` of every layer: `layers[l][j]` is
/// expert `first + j` of layer `l` (none in a dense layer).
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
                let count = if c.is_dense(i) { 0 } else { count };
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
