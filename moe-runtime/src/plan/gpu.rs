//! The GPU catalogue: the paper's Table 3 plus H100, H200 and A100, and
//! operators' own entries from a JSON file.

use serde::{Deserialize, Serialize};

use super::PlanError;

/// One GPU type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    pub name: String,
    /// Price per GPU, normalised to L20 = 1.00.
    pub price: f64,
    pub memory_gb: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbps: f64,
    /// Dense bf16 TFLOPS.
    pub tflops: f64,
    /// Network bandwidth per GPU, Gb/s.
    pub nic_gbits: f64,
}

impl GpuSpec {
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gb * 1e9
    }
    pub fn bandwidth_bytes(&self) -> f64 {
        self.bandwidth_gbps * 1e9
    }
    pub fn flops(&self) -> f64 {
        self.tflops * 1e12
    }
    pub fn nic_bytes(&self) -> f64 {
        self.nic_gbits * 1e9 / 8.0
    }
}

/// The built-in catalogue.
///
/// Price, memory, bandwidth and TFLOPS of L20, H800, A800, H20 and L40S are
/// the paper's Table 3. ASSUMPTIONS, not from the paper: H100 and A100 are
/// priced like their export variants H800 and A800; H200 at 6.50; H100 989
/// TFLOPS / 3350 GB/s; H200 989 / 4800 GB/s / 141 GB; A100 312 / 2039. NIC
/// bandwidth per GPU: 400 Gb/s on SXM parts (H800, H100, H200, A800, A100,
/// H20), 200 Gb/s on the PCIe cards (L20, L40S).
pub fn catalogue() -> Vec<GpuSpec> {
    let g = |name: &str, price, memory_gb, bandwidth_gbps, tflops, nic_gbits| GpuSpec {
        name: name.into(),
        price,
        memory_gb,
        bandwidth_gbps,
        tflops,
        nic_gbits,
    };
    vec![
        g("L20", 1.00, 48.0, 864.0, 119.5, 200.0),
        g("H800", 5.28, 80.0, 3430.4, 989.0, 400.0),
        g("A800", 2.26, 80.0, 2039.0, 312.0, 400.0),
        g("H20", 1.85, 96.0, 4096.0, 148.0, 400.0),
        g("L40S", 1.08, 48.0, 864.0, 362.0, 200.0),
        g("H100", 5.28, 80.0, 3350.0, 989.0, 400.0),
        g("H200", 6.50, 141.0, 4800.0, 989.0, 400.0),
        g("A100", 2.26, 80.0, 2039.0, 312.0, 400.0),
    ]
}

/// The built-in catalogue with entries from `json` (a list of GpuSpec)
/// added, replacing built-ins of the same name.
pub fn with_file(json: &str) -> Result<Vec<GpuSpec>, PlanError> {
    let extra: Vec<GpuSpec> = serde_json::from_str(json)
        .map_err(|e| PlanError::BadConfig(format!("GPU catalogue: {e}")))?;
    let mut all = catalogue();
    for e in extra {
        if e.price <= 0.0
            || e.memory_gb <= 0.0
            || e.bandwidth_gbps <= 0.0
            || e.tflops <= 0.0
            || e.nic_gbits <= 0.0
        {
            return Err(PlanError::BadConfig(format!(
                "GPU {}: every number must be positive",
                e.name
            )));
        }
        all.retain(|g| !g.name.eq_ignore_ascii_case(&e.name));
        all.push(e);
    }
    Ok(all)
}

/// A GPU by name, or an error listing the known ones.
pub fn find(all: &[GpuSpec], name: &str) -> Result<GpuSpec, PlanError> {
    all.iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
        .cloned()
        .ok_or_else(|| PlanError::UnknownGpu {
            name: name.into(),
            known: all
                .iter()
                .map(|g| g.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_3_and_lookups() {
        let all = catalogue();
        let h20 = find(&all, "h20").unwrap();
        assert_eq!(
            (h20.price, h20.memory_gb, h20.bandwidth_gbps, h20.tflops),
            (1.85, 96.0, 4096.0, 148.0)
        );
        let err = find(&all, "B300").unwrap_err().to_string();
        assert!(err.contains("L40S") && err.contains("H800"), "{err}");
        let custom = with_file(r#"[{"name": "L20", "price": 0.9, "memory_gb": 48, "bandwidth_gbps": 864, "tflops": 119.5, "nic_gbits": 100}]"#).unwrap();
        assert_eq!(find(&custom, "L20").unwrap().price, 0.9);
        assert!(with_file(r#"[{"name": "X", "price": 0, "memory_gb": 1, "bandwidth_gbps": 1, "tflops": 1, "nic_gbits": 1}]"#).is_err());
    }
}
