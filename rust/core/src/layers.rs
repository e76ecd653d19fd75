//! Each replica's store stack: backend → [`ChaosStore`] (when the
//! configuration injects faults into that replica) → [`VerifyingStore`]
//! (when a manifest is given). Verification sits above chaos so injected
//! corruption is caught exactly as a real bad disk would be; the router sits
//! above both, so a mismatch or an injected error is one replica's failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::chaos::{ChaosSpec, ChaosStats, ChaosStore};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ManifestSource, VerifyStats, VerifyingStore};
use crate::store::Store;

/// What was injected into and verified on one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFaultStats {
    pub index: usize,
    pub replica: String,
    pub chaos: Option<ChaosStats>,
    pub verify: Option<VerifyStats>,
}

#[derive(Debug)]
struct Layers {
    index: usize,
    replica: String,
    chaos: Option<Arc<ChaosStore>>,
    verify: Option<Arc<VerifyingStore>>,
}

/// Handles on the layers of every replica, kept for stats.
#[derive(Debug, Default)]
pub struct ReplicaLayers {
    layers: Vec<Layers>,
    manifest: Option<Arc<Manifest>>,
}

impl ReplicaLayers {
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    pub fn fault_stats(&self) -> Vec<ReplicaFaultStats> {
        self.layers
            .iter()
            .map(|l| ReplicaFaultStats {
                index: l.index,
                replica: l.replica.clone(),
                chaos: l.chaos.as_ref().map(|c| c.stats()),
                verify: l.verify.as_ref().map(|v| v.stats()),
            })
            .collect()
    }
}

/// Wraps each replica's backend (in replica order) per `chaos` (replica
/// index → spec) and `manifest`. Refuses chaos for a replica that does not
/// exist and a manifest naming keys that no backend holds (checked on the
/// raw backends, so an injected outage cannot fail construction).
pub fn wrap_replicas(
    backends: Vec<Arc<dyn Store>>,
    chaos: &BTreeMap<usize, ChaosSpec>,
    manifest: Option<&ManifestSource>,
) -> Result<(Vec<Arc<dyn Store>>, ReplicaLayers)> {
    if let Some((&index, _)) = chaos.range(backends.len()..).next() {
        return Err(Error::invalid(format!(
            "chaos given for replica {index}, but there are only {} replica(s) (indices 0..{})",
            backends.len(),
            backends.len()
        )));
    }
    let manifest = manifest.map(|m| m.load().map(Arc::new)).transpose()?;
    if let Some(m) = &manifest {
        m.check_keys(&backends)?;
    }
    let mut stores = Vec::with_capacity(backends.len());
    let mut layers = Vec::with_capacity(backends.len());
    for (index, backend) in backends.into_iter().enumerate() {
        let replica = backend.name().to_owned();
        let mut store = backend;
        let chaos_store = match chaos.get(&index) {
            Some(spec) => {
                let c = Arc::new(ChaosStore::new(store, spec.clone())?);
                store = Arc::clone(&c) as Arc<dyn Store>;
                Some(c)
            }
            None => None,
        };
        let verify = manifest.as_ref().map(|m| {
            let v = Arc::new(VerifyingStore::new(Arc::clone(&store), Arc::clone(m)));
            store = Arc::clone(&v) as Arc<dyn Store>;
            v
        });
        stores.push(store);
        layers.push(Layers {
            index,
            replica,
            chaos: chaos_store,
            verify,
        });
    }
    Ok((stores, ReplicaLayers { layers, manifest }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn refuses_chaos_for_a_missing_replica() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let chaos = BTreeMap::from([(1, ChaosSpec::default())]);
        let err = wrap_replicas(vec![backend], &chaos, None).unwrap_err();
        assert!(err.to_string().contains("replica 1"), "{err}");
    }
}
