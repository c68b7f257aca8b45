//! [`FakeNetwork`]: the network role without a network, for the tests of the layers above
//! (the gateway's API tests of create, kill, `PUT /sandboxes/{id}/network`, restart). It
//! hands out addresses from a pool like the real driver, keeps policies, records every call,
//! and can be told to fail the next operation. Never wired into a binary.

use std::collections::BTreeMap;
use std::sync::Mutex;

use coppice_lifecycle::backend::{
    BackendError, Capabilities, EgressPolicy, Ipv4Cidr, NetAttachment, NetSpec, Network, SandboxId,
};

use crate::pool::Pool;

/// A recording, in-memory [`Network`].
#[derive(Debug)]
pub struct FakeNetwork {
    state: Mutex<Fake>,
}

#[derive(Debug)]
struct Fake {
    pool: Pool,
    held: BTreeMap<SandboxId, NetAttachment>,
    calls: Vec<String>,
    fail_next: Option<&'static str>,
}

impl FakeNetwork {
    /// A fake with sandbox addresses from `pool` (a /16 to a /29).
    pub fn new(pool: Ipv4Cidr) -> Result<Self, BackendError> {
        Ok(Self {
            state: Mutex::new(Fake {
                pool: Pool::new(pool)?,
                held: BTreeMap::new(),
                calls: Vec::new(),
                fail_next: None,
            }),
        })
    }

    /// Every call so far, e.g. `attach abc`, `update_policy abc`, `release abc`,
    /// `recover abc,def`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Makes the next call of `op` (`attach`, `update_policy`, `release`, `recover`) fail
    /// with [`BackendError::Io`].
    pub fn fail_next(&self, op: &'static str) {
        self.lock().fail_next = Some(op);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(
        &self,
        op: &'static str,
        what: &str,
    ) -> Result<std::sync::MutexGuard<'_, Fake>, BackendError> {
        let mut s = self.lock();
        s.calls.push(format!("{op} {what}"));
        if s.fail_next == Some(op) {
            s.fail_next = None;
            return Err(BackendError::io(
                op,
                "",
                std::io::Error::other("told to fail"),
            ));
        }
        Ok(s)
    }
}

impl Network for FakeNetwork {
    fn probe() -> Result<Capabilities, BackendError> {
        Ok(Capabilities {
            driver: "fake".into(),
            features: Vec::new(),
        })
    }

    async fn attach(&self, id: &SandboxId, spec: &NetSpec) -> Result<NetAttachment, BackendError> {
        let mut s = self.enter("attach", id.as_str())?;
        if s.held.contains_key(id) {
            return Err(BackendError::AlreadyExists {
                kind: "sandbox network",
                id: id.to_string(),
            });
        }
        let addr = s.pool.take()?;
        let gateway = s.pool.gateway();
        let a = NetAttachment {
            id: id.clone(),
            address: Ipv4Cidr::new(addr, s.pool.cidr().prefix())?,
            gateway,
            dns: gateway,
            namespace: None,
            interface: "eth0".into(),
            policy: spec.policy.clone(),
        };
        s.held.insert(id.clone(), a.clone());
        Ok(a)
    }

    async fn update_policy(
        &self,
        id: &SandboxId,
        policy: &EgressPolicy,
    ) -> Result<NetAttachment, BackendError> {
        let mut s = self.enter("update_policy", id.as_str())?;
        let a = s.held.get_mut(id).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox network",
            id: id.to_string(),
        })?;
        a.policy = policy.clone();
        Ok(a.clone())
    }

    async fn release(&self, id: &SandboxId) -> Result<(), BackendError> {
        let mut s = self.enter("release", id.as_str())?;
        let a = s.held.remove(id).ok_or_else(|| BackendError::NotFound {
            kind: "sandbox network",
            id: id.to_string(),
        })?;
        s.pool.put(a.address.addr());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<NetAttachment>, BackendError> {
        Ok(self.lock().held.values().cloned().collect())
    }

    async fn recover(&self, live: &[SandboxId]) -> Result<Vec<NetAttachment>, BackendError> {
        let names: Vec<&str> = live.iter().map(SandboxId::as_str).collect();
        let mut s = self.enter("recover", &names.join(","))?;
        let gone: Vec<SandboxId> = s
            .held
            .keys()
            .filter(|id| !live.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(a) = s.held.remove(&id) {
                s.pool.put(a.address.addr());
            }
        }
        Ok(s.held.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fake_allocates_records_and_fails_on_demand() {
        let net = FakeNetwork::new("198.51.100.128/29".parse().unwrap()).unwrap();
        let (a, b) = (SandboxId::new("a").unwrap(), SandboxId::new("b").unwrap());
        let got = net.attach(&a, &NetSpec::default()).await.unwrap();
        assert_eq!(got.address.to_string(), "198.51.100.130/29");
        net.fail_next("attach");
        let r = net.attach(&b, &NetSpec::default()).await;
        assert!(
            matches!(r, Err(BackendError::Io { op: "attach", .. })),
            "{r:?}"
        );
        net.attach(&b, &NetSpec::default()).await.unwrap();
        let closed = EgressPolicy {
            allow_internet: false,
            ..EgressPolicy::default()
        };
        let up = net.update_policy(&a, &closed).await.unwrap();
        assert!(!up.policy.allow_internet);
        let kept = net.recover(std::slice::from_ref(&b)).await.unwrap();
        assert_eq!(kept.len(), 1);
        let again = net.attach(&a, &NetSpec::default()).await.unwrap();
        assert_eq!(again.address, got.address, "a's address was freed");
        assert_eq!(
            net.calls(),
            [
                "attach a",
                "attach b",
                "attach b",
                "update_policy a",
                "recover b",
                "attach a"
            ]
        );
    }
}
