//! pyreft save folders (pyreft 0.1.0 on pyvene 0.1.8) ⇄ plain Rust structs.
//!
//! A folder holds `config.json` (pyvene's `IntervenableConfig`) and one `intkey_<key>.bin` per
//! intervention: a `torch.save` zip pickle of the intervention's state dict, read with the
//! allow-listed interpreter in [`crate::torch_file`], so importing a folder never executes code.
//!
//! What pyreft's classes store, and what we turn it into (SPEC §2 names, f32 on CPU):
//!
//! | pyreft class | our kind | file keys → params |
//! |---|---|---|
//! | `LoreftIntervention` | `loreft` | `weight` → W, `bias` → b, `rotate_layer` [d,r] → R = rotate_layerᵀ |
//! | `NoreftIntervention` | `noreft` | `learned_source.weight/.bias` → W1, b1; `proj_layer.weight(/.bias)` → W2 (, b2) |
//! | `NodireftIntervention` | `direft` | `learned_source.weight/.bias` → W1, b1; `proj_layer.weight` → W2 |
//! | `DireftIntervention` | `direft_orth` | `learned_source.weight/.bias` → W, b; R |
//! | `ConsreftIntervention` | `consreft` | `learned_source` [r] → b; R |
//! | `LobireftIntervention` | `lobireft` | `learned_source` [r] → b; R |
//!
//! LoReFT overrides `state_dict` and saves its rotation materialised. The other classes save the
//! module's full state: `embed_dim`/`interchange_dim` (int64 scalars) and, for R, PyTorch's
//! orthogonal parametrisation (`rotate_layer.parametrizations.weight.original` [d,r] and
//! `….weight.0.base` [d,d]), from which [`torch_orthogonal_weight`] recomputes Rᵀ exactly as
//! `torch.nn.utils.parametrizations.orthogonal` (Householder map) does.
//! `NodireftIntervention`'s `proj_layer.bias` (present when it was built with `add_bias=True`) is
//! not used by its forward, so it is accepted and dropped.
//!
//! Reloading our exports in pyreft itself (`ReftModel.load` → `IntervenableModel.load`, which
//! rebuilds each intervention from `config.json` and then calls its `load_state_dict`):
//! - `loreft`, `consreft`, `lobireft`, `direft_orth` load as they are.
//! - `noreft` and `direft` (pyreft's `NoreftIntervention`/`NodireftIntervention`) cannot be rebuilt
//!   from any config.json: their constructors read `kwargs["add_bias"]`, which pyvene never saves,
//!   so pyvene's `load` raises `KeyError: 'add_bias'` for folders pyreft wrote itself too. Users
//!   must build the model in Python (with `add_bias` = whether b2 exists, `False` for `direft`)
//!   and load each `intkey_*.bin` with `load_state_dict`; our files match that state dict.
//! - pyreft builds `learned_source` in bf16 unless told otherwise, so W/b round to bf16 on load
//!   there; the files hold f32.
//!
//! (Checked against pyreft 0.1.0, pyvene 0.1.8 and PyTorch 2.x: `torch.load(weights_only=True)`
//! opens our files, strict `load_state_dict` accepts them with R reproduced bit for bit, and our
//! reader gives PyTorch's R to f32 rounding for folders pyreft's own `save` wrote.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::pickle::{read_torch_file, write_torch_file, PickleValue};
use crate::{Error, Result};

/// One intervention of a pyreft folder, in this crate's conventions.
#[derive(Debug, Clone)]
pub struct PyreftIntervention {
    /// pyvene's key, e.g. `layer_6_comp_block_output_unit_pos_nunit_1#0`, as the folder spells
    /// it. On write it is recomputed from layer and component (see [`write_pyreft`]).
    pub key: String,
    /// The layer whose `component` is edited (0-based).
    pub layer: usize,
    /// pyvene's component name: `block_output`, `block_input`, `attention_output`, `mlp_output`, …
    pub component: String,
    /// Our kind name: `loreft`, `noreft`, `direft`, `direft_orth`, `consreft` or `lobireft`.
    pub kind: String,
    /// The low-rank dimension r.
    pub rank: usize,
    /// The hidden size d.
    pub embed_dim: usize,
    /// Parameters by SPEC §2 name, f32 on CPU: `R`, `W`, `W1`, `W2` are [r, d] (R with
    /// orthonormal rows); `b`, `b1`, `b2` are [r].
    pub params: BTreeMap<String, Tensor>,
}

/// pyreft's class names and our kind names.
const CLASSES: &[(&str, &str)] = &[
    ("LoreftIntervention", "loreft"),
    ("NoreftIntervention", "noreft"),
    ("NodireftIntervention", "direft"),
    ("DireftIntervention", "direft_orth"),
    ("ConsreftIntervention", "consreft"),
    ("LobireftIntervention", "lobireft"),
];

const ORIGINAL: &str = "rotate_layer.parametrizations.weight.original";
const BASE: &str = "rotate_layer.parametrizations.weight.0.base";

fn kind_of_class(class: &str) -> Option<&'static str> {
    CLASSES.iter().find(|(c, _)| *c == class).map(|(_, k)| *k)
}

fn class_of_kind(kind: &str) -> Option<&'static str> {
    CLASSES.iter().find(|(_, k)| *k == kind).map(|(c, _)| *c)
}

fn config_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadConfig {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadWeights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

// ------------------------------------------------------------------------------------------------
// Reading

/// One entry of `representations`, the fields we need.
struct Representation {
    layer: usize,
    component: String,
    unit: String,
    nunit: u64,
    rank: usize,
}

/// Reads a pyreft save folder: `config.json` plus one `intkey_<key>.bin` per intervention.
pub fn read_pyreft(dir: &Path) -> Result<Vec<PyreftIntervention>> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| config_err(&cfg_path, format!("not valid JSON: {e}")))?;

    let reps = cfg
        .get("representations")
        .and_then(Value::as_array)
        .ok_or_else(|| config_err(&cfg_path, "no `representations` list"))?;
    let reps = reps
        .iter()
        .enumerate()
        .map(|(i, r)| parse_representation(r, i, &cfg_path))
        .collect::<Result<Vec<_>>>()?;

    // `intervention_types`: one class string per representation, or one for all.
    let types: Vec<String> = match cfg.get("intervention_types") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| config_err(&cfg_path, "`intervention_types` holds a non-string"))?,
        Some(Value::String(s)) => vec![s.clone(); reps.len()],
        _ => return Err(config_err(&cfg_path, "no `intervention_types`")),
    };
    if types.len() != reps.len() {
        return Err(config_err(
            &cfg_path,
            format!(
                "{} intervention_types for {} representations",
                types.len(),
                reps.len()
            ),
        ));
    }
    let sorted_keys: Option<Vec<String>> = match cfg.get("sorted_keys") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| config_err(&cfg_path, "`sorted_keys` holds a non-string"))?,
        ),
        Some(_) => return Err(config_err(&cfg_path, "`sorted_keys` is not a list")),
    };
    let dims: Vec<Option<u64>> = match cfg.get("intervention_dimensions") {
        Some(Value::Array(a)) => a.iter().map(Value::as_u64).collect(),
        _ => Vec::new(),
    };

    // pyvene numbers repeated (layer, component, unit, nunit) proposals #0, #1, … in order.
    let mut collisions: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(reps.len());
    for (i, rep) in reps.into_iter().enumerate() {
        let class = class_name(&types[i]);
        let kind = kind_of_class(class).ok_or_else(|| {
            config_err(
                &cfg_path,
                format!(
                    "intervention type `{}` is not one we can import (known: {})",
                    types[i],
                    CLASSES
                        .iter()
                        .map(|(c, _)| *c)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        if rep.unit != "pos" || rep.nunit != 1 {
            return Err(config_err(
                &cfg_path,
                format!(
                    "representation {i}: unit `{}` with max_number_of_units {} is not supported \
                     (only unit `pos`, 1 unit)",
                    rep.unit, rep.nunit
                ),
            ));
        }
        let (new_key, old_key) = key_spellings(&rep, &mut collisions);
        let key = pick_key(dir, &[new_key, old_key], sorted_keys.as_deref(), i);
        let file = dir.join(format!("intkey_{key}.bin"));
        if !file.exists() {
            return Err(Error::MissingTensor {
                name: format!("intervention `{key}`"),
                path: file,
            });
        }
        let (params, embed_dim) = read_params(&file, kind, rep.rank)?;
        if let Some(Some(d)) = dims.get(i) {
            if *d as usize != embed_dim {
                return Err(config_err(
                    &cfg_path,
                    format!(
                        "intervention_dimensions[{i}] = {d}, but {} holds tensors of width {embed_dim}",
                        file.display()
                    ),
                ));
            }
        }
        out.push(PyreftIntervention {
            key,
            layer: rep.layer,
            component: rep.component,
            kind: kind.to_string(),
            rank: rep.rank,
            embed_dim,
            params,
        });
    }
    Ok(out)
}

/// `"<class 'pyreft.interventions.LoreftIntervention'>"` → `LoreftIntervention`.
fn class_name(s: &str) -> &str {
    let s = s
        .trim()
        .trim_start_matches("<class")
        .trim()
        .trim_end_matches('>');
    let s = s.trim().trim_matches('\'').trim_matches('"');
    s.rsplit('.').next().unwrap_or(s)
}

/// Positional `[layer, component, unit, max_number_of_units, low_rank_dimension, …]` (13 or 14
/// entries in pyvene's files; only the first five matter here), or the same fields by name.
fn parse_representation(v: &Value, i: usize, path: &Path) -> Result<Representation> {
    let field = |idx: usize, name: &str| -> Option<&Value> {
        match v {
            Value::Array(a) => a.get(idx),
            Value::Object(o) => o.get(name),
            _ => None,
        }
    };
    if !(v.is_array() && v.as_array().is_some_and(|a| a.len() >= 5) || v.is_object()) {
        return Err(config_err(
            path,
            format!("representations[{i}] is not a list of at least 5 fields"),
        ));
    }
    let err = |what: &str| config_err(path, format!("representations[{i}]: {what}"));
    let layer = match field(0, "layer") {
        None | Some(Value::Null) => 0,
        Some(l) => l
            .as_u64()
            .ok_or_else(|| err("layer is not a non-negative integer"))? as usize,
    };
    let component = match field(1, "component") {
        None | Some(Value::Null) => "block_output".to_string(),
        Some(c) => c
            .as_str()
            .ok_or_else(|| err("component is not a string"))?
            .to_string(),
    };
    let unit = match field(2, "unit") {
        None | Some(Value::Null) => "pos".to_string(),
        Some(u) => u
            .as_str()
            .ok_or_else(|| err("unit is not a string"))?
            .to_string(),
    };
    let nunit = match field(3, "max_number_of_units") {
        None | Some(Value::Null) => 1,
        Some(n) => n
            .as_u64()
            .ok_or_else(|| err("max_number_of_units is not an integer"))?,
    };
    let rank = field(4, "low_rank_dimension")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| err("low_rank_dimension is not a positive integer"))?
        as usize;
    Ok(Representation {
        layer,
        component,
        unit,
        nunit,
        rank,
    })
}

/// pyvene 0.1.8's key and the older dotted one (pyvene ≤ 0.1.4), with the collision suffix.
fn key_spellings(
    rep: &Representation,
    collisions: &mut HashMap<String, usize>,
) -> (String, String) {
    let (l, c, u, n) = (rep.layer, &rep.component, &rep.unit, rep.nunit);
    let new = if c.contains('.') {
        format!(
            "comp_{}_unit_{}_nunit_{n}",
            c.replace('.', "_"),
            u.replace('.', "_")
        )
    } else {
        format!("layer_{l}_comp_{c}_unit_{}_nunit_{n}", u.replace('.', "_"))
    };
    let old = if c.contains('.') {
        format!("comp.{c}.unit.{u}.nunit.{n}")
    } else {
        format!("layer.{l}.comp.{c}.unit.{u}.nunit.{n}")
    };
    let count = collisions.entry(new.clone()).or_insert(0);
    let suffix = *count;
    *count += 1;
    (format!("{new}#{suffix}"), format!("{old}#{suffix}"))
}

/// The key as the folder spells it: a computed spelling that `sorted_keys` lists and whose file
/// exists; else `sorted_keys[i]` (a sort function may have reordered nothing we can recompute);
/// else the current spelling (so the error names the file pyvene would look for).
fn pick_key(dir: &Path, candidates: &[String], sorted: Option<&[String]>, i: usize) -> String {
    let exists = |k: &str| dir.join(format!("intkey_{k}.bin")).exists();
    for c in candidates {
        let listed = match sorted {
            Some(s) => s.contains(c),
            None => true,
        };
        if listed && exists(c) {
            return c.clone();
        }
    }
    if let Some(k) = sorted.and_then(|s| s.get(i)) {
        if exists(k) {
            return k.clone();
        }
    }
    candidates[0].clone()
}

/// A loaded state dict whose entries are taken one by one, so leftovers can be reported.
struct StateDict<'p> {
    path: &'p Path,
    items: BTreeMap<String, PickleValue>,
}

impl StateDict<'_> {
    fn take_opt(&mut self, name: &str) -> Result<Option<Tensor>> {
        match self.items.remove(name) {
            None => Ok(None),
            Some(PickleValue::Tensor(t)) => Ok(Some(t.to_dtype(DType::F32)?)),
            Some(_) => Err(bad(
                self.path,
                format!("`{name}` is a number, not a tensor"),
            )),
        }
    }

    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.take_opt(name)?.ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.to_path_buf(),
        })
    }

    /// An int64 scalar (`embed_dim`, `interchange_dim`), as a 0-d tensor or a plain int.
    fn take_int(&mut self, name: &str) -> Result<Option<i64>> {
        match self.items.remove(name) {
            None => Ok(None),
            Some(PickleValue::Int(i)) => Ok(Some(i)),
            Some(PickleValue::Tensor(t)) if t.elem_count() == 1 => Ok(Some(
                t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0],
            )),
            Some(_) => Err(bad(self.path, format!("`{name}` is not an integer scalar"))),
        }
    }

    fn finish(self) -> Result<()> {
        if self.items.is_empty() {
            Ok(())
        } else {
            Err(bad(
                self.path,
                format!(
                    "unexpected entries {:?} for this intervention type; refusing to drop them",
                    self.items.keys().collect::<Vec<_>>()
                ),
            ))
        }
    }
}

fn check_shape(t: &Tensor, name: &str, path: &Path, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            path: path.to_path_buf(),
            expected: expected.to_vec(),
            actual: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// The hidden size from a tensor that must be `[r, d]` (`rd`) or `[d, r]` (not `rd`).
fn width(t: &Tensor, name: &str, path: &Path, r: usize, rd: bool) -> Result<usize> {
    let dims = t.dims();
    let d = match (dims, rd) {
        ([a, d], true) if *a == r => Some(*d),
        ([d, b], false) if *b == r => Some(*d),
        _ => None,
    };
    d.filter(|&d| d > 0).ok_or_else(|| Error::ShapeMismatch {
        name: name.to_string(),
        path: path.to_path_buf(),
        expected: if rd { vec![r, 0] } else { vec![0, r] },
        actual: dims.to_vec(),
    })
}

/// Reads one `intkey_*.bin` and maps its state dict to our parameters; returns them and d.
fn read_params(path: &Path, kind: &str, r: usize) -> Result<(BTreeMap<String, Tensor>, usize)> {
    let mut sd = StateDict {
        path,
        items: read_torch_file(path)?.into_iter().collect(),
    };
    let mut p = BTreeMap::new();
    let d;
    match kind {
        "loreft" => {
            let w = sd.take("weight")?;
            d = width(&w, "weight", path, r, true)?;
            let b = sd.take("bias")?;
            check_shape(&b, "bias", path, &[r])?;
            let rt = sd.take("rotate_layer")?;
            check_shape(&rt, "rotate_layer", path, &[d, r])?;
            p.insert("R".into(), rt.t()?.contiguous()?);
            p.insert("W".into(), w);
            p.insert("b".into(), b);
        }
        "noreft" | "direft" => {
            let w1 = sd.take("learned_source.weight")?;
            d = width(&w1, "learned_source.weight", path, r, true)?;
            let b1 = sd.take("learned_source.bias")?;
            check_shape(&b1, "learned_source.bias", path, &[r])?;
            let w2 = sd.take("proj_layer.weight")?;
            check_shape(&w2, "proj_layer.weight", path, &[r, d])?;
            let b2 = sd.take_opt("proj_layer.bias")?;
            if let Some(b2) = &b2 {
                check_shape(b2, "proj_layer.bias", path, &[r])?;
            }
            p.insert("W1".into(), w1);
            p.insert("b1".into(), b1);
            p.insert("W2".into(), w2);
            // NodiReFT's forward never uses proj_layer's bias: drop it rather than invent a b2.
            if let (Some(b2), "noreft") = (b2, kind) {
                p.insert("b2".into(), b2);
            }
        }
        "direft_orth" | "consreft" | "lobireft" => {
            let original = sd.take(ORIGINAL)?;
            d = width(&original, ORIGINAL, path, r, false)?;
            if r >= d {
                return Err(bad(
                    path,
                    format!(
                        "rank {r} ≥ hidden size {d}: PyTorch uses another orthogonal map there"
                    ),
                ));
            }
            let base = sd.take(BASE)?;
            check_shape(&base, BASE, path, &[d, d])?;
            let rt = torch_orthogonal_weight(&original, &base)?;
            p.insert("R".into(), rt.t()?.contiguous()?);
            if kind == "direft_orth" {
                let w = sd.take("learned_source.weight")?;
                check_shape(&w, "learned_source.weight", path, &[r, d])?;
                let b = sd.take("learned_source.bias")?;
                check_shape(&b, "learned_source.bias", path, &[r])?;
                p.insert("W".into(), w);
                p.insert("b".into(), b);
            } else {
                let b = sd.take("learned_source")?;
                check_shape(&b, "learned_source", path, &[r])?;
                p.insert("b".into(), b);
            }
        }
        // `kind` comes from CLASSES, whose kinds are all handled above.
        other => return Err(bad(path, format!("no reader for kind `{other}`"))),
    }
    if let Some(e) = sd.take_int("embed_dim")? {
        if e != d as i64 {
            return Err(bad(
                path,
                format!("embed_dim = {e}, but the tensors are {d} wide"),
            ));
        }
    }
    // interchange_dim is pyvene's subspace width; it carries nothing for these classes.
    sd.take_int("interchange_dim")?;
    sd.finish()?;
    Ok((p, d))
}

/// Rᵀ (the `[d, r]` weight) from PyTorch's orthogonal parametrisation, Householder map with
/// trivialisation, exactly as `torch.nn.utils.parametrizations._Orthogonal.forward` computes it:
/// `A = tril(X, −1)`, `τᵢ = 2 / (1 + ‖A[:, i]‖²)`, `Q = householder_product(A, τ)` (reflectors
/// `vᵢ` with an implicit 1 at row i, `Q = H₁ ⋯ H_r I[:, :r]`), then column j of Q times
/// `int(X[j, j])` (truncation toward zero, as `.int()` does: −1 for an untouched initial value),
/// and finally `base · Q`. Computed in f64, returned in f32. `X` is `[d, r]` with d > r, `base`
/// `[d, d]`; a wide `X` (d < r) is handled transposed, as PyTorch does.
pub fn torch_orthogonal_weight(original: &Tensor, base: &Tensor) -> Result<Tensor> {
    let (rows, cols) = original.dims2()?;
    if rows < cols {
        let w = torch_orthogonal_weight(&original.t()?.contiguous()?, base)?;
        return Ok(w.t()?.contiguous()?);
    }
    let (n, k) = (rows, cols);
    if n == k {
        return Err(Error::InvalidArgument(
            "square orthogonal parametrisations use PyTorch's matrix_exp map, not supported".into(),
        ));
    }
    let (bn, bm) = base.dims2()?;
    if (bn, bm) != (n, n) {
        return Err(Error::InvalidArgument(format!(
            "orthogonal parametrisation: base is [{bn}, {bm}], expected [{n}, {n}]"
        )));
    }
    let x: Vec<f64> = original.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    // Q starts as I[:, :k]; reflectors are applied last-first: Q = H₁(H₂(⋯(H_k I)))
    let mut q = vec![0f64; n * k];
    for j in 0..k {
        q[j * k + j] = 1.0;
    }
    let mut w = vec![0f64; k];
    for i in (0..k).rev() {
        // v = e_i + A[i+1.., i]
        let norm2: f64 = (i + 1..n).map(|r| x[r * k + i] * x[r * k + i]).sum();
        let tau = 2.0 / (1.0 + norm2);
        // w = vᵀ Q (rows < i of v are zero)
        for c in 0..k {
            let mut s = q[i * k + c];
            for r in i + 1..n {
                s += x[r * k + i] * q[r * k + c];
            }
            w[c] = s;
        }
        for c in 0..k {
            q[i * k + c] -= tau * w[c];
        }
        for r in i + 1..n {
            let vr = x[r * k + i];
            if vr != 0.0 {
                for c in 0..k {
                    q[r * k + c] -= tau * vr * w[c];
                }
            }
        }
    }
    for c in 0..k {
        // `X.diagonal().int()`: the f32 value truncated toward zero.
        let s = (x[c * k + c] as f32) as i32 as f64;
        for r in 0..n {
            q[r * k + c] *= s;
        }
    }
    let b: Vec<f64> = base.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0f64; n * k];
    for r in 0..n {
        let brow = &b[r * n..(r + 1) * n];
        let orow = &mut out[r * k..(r + 1) * k];
        for (m, &bv) in brow.iter().enumerate() {
            if bv != 0.0 {
                let qrow = &q[m * k..(m + 1) * k];
                for (o, &qv) in orow.iter_mut().zip(qrow) {
                    *o += bv * qv;
                }
            }
        }
    }
    let out: Vec<f32> = out.into_iter().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(out, (n, k), &Device::Cpu)?)
}

/// The `(original, base)` pair PyTorch itself holds right after `orthogonal()` is registered on a
/// weight equal to Rᵀ: `original = −I[:, :r]` (which the map sends to `I[:, :r]`) and `base` an
/// orthogonal `[d, d]` matrix whose first r columns are Rᵀ exactly. The map then gives back Rᵀ
/// bit for bit, and training can continue in PyTorch from a proper (orthogonal) base.
///
/// The other d − r columns: those of H₁⋯H_r from a Householder QR of Rᵀ, i.e. an orthonormal
/// basis of the complement of R's row space, computed in O(d² r).
pub fn torch_orthogonal_state(r: &Tensor) -> Result<(Tensor, Tensor)> {
    let (k, n) = r.dims2()?;
    if k == 0 || k >= n {
        return Err(Error::InvalidArgument(format!(
            "orthogonal parametrisation needs 0 < rank < hidden size, got R of [{k}, {n}]"
        )));
    }
    let rt = r.to_dtype(DType::F32)?.t()?.contiguous()?; // [n, k]
    let rt32: Vec<f32> = rt.flatten_all()?.to_vec1()?;
    // Householder QR of Rᵀ: reflector j acts on rows j.. with vector v_j (unnormalised).
    let mut m: Vec<f64> = rt32.iter().map(|&v| v as f64).collect();
    let mut refl: Vec<Option<(Vec<f64>, f64)>> = Vec::with_capacity(k);
    for j in 0..k {
        let norm = (j..n)
            .map(|i| m[i * k + j] * m[i * k + j])
            .sum::<f64>()
            .sqrt();
        let x0 = m[j * k + j];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (j..n).map(|i| m[i * k + j]).collect();
        v[0] -= alpha;
        let vn2: f64 = v.iter().map(|a| a * a).sum();
        if vn2 == 0.0 {
            refl.push(None);
            continue;
        }
        let tau = 2.0 / vn2;
        for c in j..k {
            let s: f64 = (j..n).map(|i| v[i - j] * m[i * k + c]).sum();
            for i in j..n {
                m[i * k + c] -= tau * v[i - j] * s;
            }
        }
        refl.push(Some((v, tau)));
    }
    let mut base = vec![0f32; n * n];
    for i in 0..n {
        base[i * n..i * n + k].copy_from_slice(&rt32[i * k..(i + 1) * k]);
    }
    let mut y = vec![0f64; n];
    for c in k..n {
        y.iter_mut().for_each(|v| *v = 0.0);
        y[c] = 1.0;
        for (j, h) in refl.iter().enumerate().rev() {
            if let Some((v, tau)) = h {
                let s: f64 = (j..n).map(|i| v[i - j] * y[i]).sum();
                for i in j..n {
                    y[i] -= tau * v[i - j] * s;
                }
            }
        }
        for i in 0..n {
            base[i * n + c] = y[i] as f32;
        }
    }
    let mut original = vec![0f32; n * k];
    for j in 0..k {
        original[j * k + j] = -1.0;
    }
    Ok((
        Tensor::from_vec(original, (n, k), &Device::Cpu)?,
        Tensor::from_vec(base, (n, n), &Device::Cpu)?,
    ))
}

// ------------------------------------------------------------------------------------------------
// Writing

/// Writes a pyreft save folder (created if needed) that pyreft 0.1.0 / pyvene 0.1.8 read.
///
/// Keys are recomputed from layer and component in pyvene 0.1.8's spelling
/// (`layer_<l>_comp_<c>_unit_pos_nunit_1#<n>`), whatever `key` says, because pyvene's `load`
/// derives the file names from `config.json` the same way. LoReFT files hold `weight`, `bias`,
/// `rotate_layer` like pyreft's own; other kinds hold the full state dict pyreft's classes have
/// (see the module docs for which of those pyreft can rebuild). Tensors are written in f32.
pub fn write_pyreft(dir: &Path, ivs: &[PyreftIntervention]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut collisions = HashMap::new();
    let mut reps = Vec::new();
    let mut types = Vec::new();
    let mut keys = Vec::new();
    let mut dims = Vec::new();
    let mut files = Vec::new();
    for (i, iv) in ivs.iter().enumerate() {
        let class = class_of_kind(&iv.kind).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "intervention {i}: kind `{}` has no pyreft class (pyreft has {})",
                iv.kind,
                CLASSES
                    .iter()
                    .map(|(_, k)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let rep = Representation {
            layer: iv.layer,
            component: iv.component.clone(),
            unit: "pos".into(),
            nunit: 1,
            rank: iv.rank,
        };
        let (key, _) = key_spellings(&rep, &mut collisions);
        let entries = state_dict(iv, i)?;
        files.push((dir.join(format!("intkey_{key}.bin")), entries));
        reps.push(json!([
            iv.layer,
            iv.component,
            "pos",
            1,
            iv.rank,
            null,
            null,
            null,
            null,
            null,
            null,
            null,
            null,
            null
        ]));
        types.push(format!("<class 'pyreft.interventions.{class}'>"));
        keys.push(key);
        dims.push(iv.embed_dim);
    }
    for (path, entries) in &files {
        write_torch_file(path, entries)?;
    }
    // As IntervenableConfig.save_pretrained writes it (sorted keys, 2-space indent); written
    // last so that a folder with a config.json is complete.
    let cfg = json!({
        "intervention_constant_sources": vec![true; ivs.len()],
        "intervention_dimensions": dims,
        "intervention_types": types,
        "mode": "parallel",
        "representations": reps,
        "sorted_keys": keys,
        "transformers_version": "4.45.1",
    });
    let mut text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::InvalidArgument(format!("serialising config.json: {e}")))?;
    text.push('\n');
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension(format!("json.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        // Best effort: the temporary file is ours and useless now.
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// The params of `iv`, checked against its kind, rank and hidden size, as f32.
fn checked_params(iv: &PyreftIntervention, i: usize) -> Result<HashMap<&'static str, Tensor>> {
    let (r, d) = (iv.rank, iv.embed_dim);
    let (required, optional): (&[&'static str], &[&'static str]) = match iv.kind.as_str() {
        "loreft" | "direft_orth" => (&["R", "W", "b"], &[]),
        "noreft" => (&["W1", "b1", "W2"], &["b2"]),
        "direft" => (&["W1", "b1", "W2"], &[]),
        "consreft" | "lobireft" => (&["R", "b"], &[]),
        k => {
            return Err(Error::InvalidArgument(format!(
                "intervention {i}: unknown kind `{k}`"
            )))
        }
    };
    let err =
        |msg: String| Error::InvalidArgument(format!("intervention {i} ({}): {msg}", iv.kind));
    if r == 0 || r >= d {
        return Err(err(format!(
            "needs 0 < rank < embed_dim, got rank {r}, embed_dim {d}"
        )));
    }
    let known: HashSet<&str> = required.iter().chain(optional).copied().collect();
    if let Some(extra) = iv.params.keys().find(|k| !known.contains(k.as_str())) {
        return Err(err(format!(
            "parameter `{extra}` has no place in a pyreft file"
        )));
    }
    let mut out = HashMap::new();
    for &name in required.iter().chain(optional) {
        let Some(t) = iv.params.get(name) else {
            if required.contains(&name) {
                return Err(err(format!("parameter `{name}` is missing")));
            }
            continue;
        };
        let expected: Vec<usize> = if name.starts_with('b') {
            vec![r]
        } else {
            vec![r, d]
        };
        if t.dims() != expected.as_slice() {
            return Err(err(format!(
                "parameter `{name}` has shape {:?}, expected {expected:?}",
                t.dims()
            )));
        }
        out.insert(
            name,
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        );
    }
    if let Some(rm) = out.get("R") {
        let rr = rm
            .to_dtype(DType::F64)?
            .matmul(&rm.to_dtype(DType::F64)?.t()?)?;
        let eye = Tensor::eye(r, DType::F64, &Device::Cpu)?;
        let dev = (rr - eye)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        if dev > 1e-4 {
            return Err(err(format!(
                "R's rows are not orthonormal (max |R Rᵀ − I| = {dev:.2e}); pyreft's rotation must be"
            )));
        }
    }
    Ok(out)
}

/// The state dict pyreft's class for `iv.kind` saves, in its order.
fn state_dict(iv: &PyreftIntervention, i: usize) -> Result<Vec<(String, PickleValue)>> {
    let mut p = checked_params(iv, i)?;
    let r = p.remove("R");
    let mut take = |name: &str| -> Result<PickleValue> {
        // checked_params guarantees every required name of the kind is present.
        p.remove(name)
            .map(PickleValue::Tensor)
            .ok_or_else(|| Error::InvalidArgument(format!("intervention {i}: `{name}` is missing")))
    };
    let dim = |v: usize| -> Result<PickleValue> {
        Ok(PickleValue::Tensor(Tensor::new(v as i64, &Device::Cpu)?))
    };
    let d = iv.embed_dim;
    let mut out: Vec<(String, PickleValue)> = Vec::new();
    let mut put = |k: &str, v: PickleValue| out.push((k.to_string(), v));
    match (iv.kind.as_str(), r) {
        ("loreft", Some(r)) => {
            put("weight", take("W")?);
            put("bias", take("b")?);
            put("rotate_layer", PickleValue::Tensor(r.t()?.contiguous()?));
        }
        ("noreft" | "direft", _) => {
            put("embed_dim", dim(d)?);
            put("interchange_dim", dim(d)?);
            put("proj_layer.weight", take("W2")?);
            if let Ok(b2) = take("b2") {
                put("proj_layer.bias", b2);
            }
            put("learned_source.weight", take("W1")?);
            put("learned_source.bias", take("b1")?);
        }
        (kind @ ("direft_orth" | "consreft" | "lobireft"), Some(r)) => {
            let (original, base) = torch_orthogonal_state(&r)?;
            // Module order: own parameters, own buffers, then children in creation order.
            if kind != "direft_orth" {
                put("learned_source", take("b")?);
            }
            put("embed_dim", dim(d)?);
            put("interchange_dim", dim(d)?);
            put(ORIGINAL, PickleValue::Tensor(original));
            put(BASE, PickleValue::Tensor(base));
            if kind == "direft_orth" {
                put("learned_source.weight", take("W")?);
                put("learned_source.bias", take("b")?);
            }
        }
        (kind, _) => {
            return Err(Error::InvalidArgument(format!(
                "intervention {i}: no pyreft layout for kind `{kind}` with these parameters"
            )))
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_parse() {
        assert_eq!(
            class_name("<class 'pyreft.interventions.LoreftIntervention'>"),
            "LoreftIntervention"
        );
        assert_eq!(
            class_name("pyreft.interventions.DireftIntervention"),
            "DireftIntervention"
        );
        assert_eq!(kind_of_class("DireftIntervention"), Some("direft_orth"));
        assert_eq!(kind_of_class("NodireftIntervention"), Some("direft"));
    }

    #[test]
    fn initial_state_maps_back_to_r_exactly() {
        // R = rows 1 and 3 of I_5, with signs: orthonormal.
        let r = Tensor::new(
            &[[0f32, 1., 0., 0., 0.], [0., 0., 0., -1., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let (orig, base) = torch_orthogonal_state(&r).unwrap();
        let rt = torch_orthogonal_weight(&orig, &base).unwrap();
        assert_eq!(
            rt.t().unwrap().to_vec2::<f32>().unwrap(),
            r.to_vec2::<f32>().unwrap()
        );
        // base is orthogonal
        let bb = base.matmul(&base.t().unwrap()).unwrap();
        let eye = Tensor::eye(5, DType::F32, &Device::Cpu).unwrap();
        let dev: f32 = (bb - eye)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(dev < 1e-6, "{dev}");
    }

    #[test]
    fn keys_count_collisions() {
        let rep = Representation {
            layer: 3,
            component: "block_output".into(),
            unit: "pos".into(),
            nunit: 1,
            rank: 2,
        };
        let mut c = HashMap::new();
        assert_eq!(
            key_spellings(&rep, &mut c).0,
            "layer_3_comp_block_output_unit_pos_nunit_1#0"
        );
        let (n, o) = key_spellings(&rep, &mut c);
        assert_eq!(n, "layer_3_comp_block_output_unit_pos_nunit_1#1");
        assert_eq!(o, "layer.3.comp.block_output.unit.pos.nunit.1#1");
    }
}
