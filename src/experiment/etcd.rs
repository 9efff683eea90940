//! etcd from the host, over TLS with the lab's etcd client certificate, through the
//! etcd-client library (gRPC): probes that cost milliseconds, and the leader query
//! that the `etcd-leader` and `etcd-follower` selectors use.
//!
//! One client per member. A probe talks to one member at a time and moves to the
//! next after a failure, as etcd's own clients fail over: a killed member costs one
//! failed sample, a member cut off from the quorum costs one timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::history::Outcome;
use crate::plan::LabPlan;

/// The files a probe authenticates with.
#[derive(Clone)]
pub struct Tls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Tls {
    /// The lab's CA and the API server's etcd client certificate (signed by the lab
    /// CA; etcd accepts any client certificate of its CA).
    pub fn of_lab(plan: &LabPlan) -> Result<Tls, String> {
        let pki = &plan.paths.pki;
        let read = |p: std::path::PathBuf| {
            std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Ok(Tls {
            ca: read(crate::pki::cert_path(pki, "ca"))?,
            cert: read(crate::pki::cert_path(pki, "kube-apiserver-etcd-client"))?,
            key: read(crate::pki::key_path(pki, "kube-apiserver-etcd-client"))?,
        })
    }
}

/// A member: its node name and client URL.
#[derive(Debug, Clone)]
pub struct Member {
    pub node: String,
    pub url: String,
}

pub fn members_of(plan: &LabPlan) -> Vec<Member> {
    plan.controllers()
        .map(|n| Member {
            node: n.name.clone(),
            url: format!("https://{}:2379", n.ip),
        })
        .collect()
}

/// The result of one operation.
#[derive(Debug, Clone)]
pub struct OpResult {
    pub outcome: Outcome,
    pub value: Option<String>,
    pub endpoint: String,
    pub error: Option<String>,
}

pub struct Etcd {
    rt: tokio::runtime::Handle,
    tls: Tls,
    members: Vec<Member>,
    clients: Vec<Mutex<Option<Client>>>,
    current: AtomicUsize,
    /// Member id to node name, learnt from `member list`.
    names: Mutex<BTreeMap<u64, String>>,
}

fn opts(tls: &Tls, timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(&tls.ca))
                .identity(Identity::from_pem(&tls.cert, &tls.key)),
        )
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
}

/// A failed operation whose effect cannot have happened: refused before sending.
fn definite(e: &etcd_client::Error) -> bool {
    let s = format!("{e:?}").to_lowercase();
    s.contains("connection refused")
        || s.contains("tcp connect error")
        || s.contains("no route to host")
}

fn short(e: &etcd_client::Error) -> String {
    let s = e.to_string();
    let s = s.lines().next().unwrap_or_default().to_string();
    if s.len() > 160 {
        format!("{}...", &s[..160])
    } else {
        s
    }
}

impl Etcd {
    pub fn new(rt: tokio::runtime::Handle, tls: Tls, members: Vec<Member>) -> Etcd {
        let clients = members.iter().map(|_| Mutex::new(None)).collect();
        Etcd {
            rt,
            tls,
            members,
            clients,
            current: AtomicUsize::new(0),
            names: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    async fn client(&self, i: usize, timeout: Duration) -> Result<Client, String> {
        if let Some(c) = self.clients[i].lock().expect("client").clone() {
            return Ok(c);
        }
        let c = tokio::time::timeout(
            timeout,
            Client::connect(
                [self.members[i].url.as_str()],
                Some(opts(&self.tls, timeout)),
            ),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| short(&e))?;
        *self.clients[i].lock().expect("client") = Some(c.clone());
        Ok(c)
    }

    fn drop_client(&self, i: usize) {
        *self.clients[i].lock().expect("client") = None;
    }

    /// Run `op` against the current member within `timeout`; a failure moves the
    /// next operation to the next member.
    fn on_current<F, Fut>(&self, timeout: Duration, op: F) -> OpResult
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<Option<String>, etcd_client::Error>>,
    {
        let i = self.current.load(Ordering::SeqCst) % self.members.len().max(1);
        let endpoint = self.members[i].node.clone();
        let r = self.rt.block_on(async {
            let t0 = Instant::now();
            let c = match self.client(i, timeout).await {
                Ok(c) => c,
                Err(e) => return Err((Outcome::Fail, e)),
            };
            let left = timeout.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, op(c)).await {
                Err(_) => Err((Outcome::Indeterminate, "timed out".to_string())),
                Ok(Err(e)) => Err((
                    if definite(&e) {
                        Outcome::Fail
                    } else {
                        Outcome::Indeterminate
                    },
                    short(&e),
                )),
                Ok(Ok(v)) => Ok(v),
            }
        });
        match r {
            Ok(value) => OpResult {
                outcome: Outcome::Ok,
                value,
                endpoint,
                error: None,
            },
            Err((outcome, error)) => {
                self.drop_client(i);
                self.current.store(i + 1, Ordering::SeqCst);
                OpResult {
                    outcome,
                    value: None,
                    endpoint,
                    error: Some(error),
                }
            }
        }
    }

    /// A linearizable put of `value` at `key`.
    pub fn put(&self, key: &str, value: u64, timeout: Duration) -> OpResult {
        let (k, v) = (key.to_string(), value.to_string());
        let mut r = self.on_current(timeout, |mut c| async move {
            c.put(k, v, None).await.map(|_| None)
        });
        if r.outcome == Outcome::Ok {
            r.value = Some(value.to_string());
        }
        r
    }

    /// A linearizable get of `key`: its value, or `0` when it was never written.
    pub fn get(&self, key: &str, timeout: Duration) -> OpResult {
        let k = key.to_string();
        self.on_current(timeout, |mut c| async move {
            let r = c.get(k, None).await?;
            Ok(Some(
                r.kvs()
                    .first()
                    .and_then(|kv| kv.value_str().ok().map(str::to_string))
                    .unwrap_or_else(|| "0".into()),
            ))
        })
    }

    /// Ask every member at once who leads. `Ok(Some(node))` when the members that
    /// answered agree on a leader (the majority's view when they disagree);
    /// `Ok(None)` when those that answered know of none.
    pub fn leader(&self, timeout: Duration) -> Result<(Option<String>, String), String> {
        let answers: Vec<Result<(u64, u64), String>> = self.rt.block_on(async {
            let futs = (0..self.members.len()).map(|i| async move {
                let t0 = Instant::now();
                let mut c = self.client(i, timeout).await?;
                let left = timeout.saturating_sub(t0.elapsed());
                match tokio::time::timeout(left, c.status()).await {
                    Err(_) => Err("timed out".to_string()),
                    Ok(Err(e)) => Err(short(&e)),
                    Ok(Ok(s)) => Ok((s.header().map(|h| h.member_id()).unwrap_or(0), s.leader())),
                }
            });
            futures::future::join_all(futs).await
        });
        for (i, a) in answers.iter().enumerate() {
            if a.is_err() {
                self.drop_client(i);
            }
        }
        let ok: Vec<(u64, u64)> = answers.iter().filter_map(|a| a.clone().ok()).collect();
        if ok.is_empty() {
            let errs: Vec<String> = answers
                .iter()
                .zip(&self.members)
                .filter_map(|(a, m)| a.as_ref().err().map(|e| format!("{}: {e}", m.node)))
                .collect();
            return Err(errs.join("; "));
        }
        // Member ids to names, learnt once from a member that answered.
        let need: Vec<u64> = ok
            .iter()
            .flat_map(|(m, l)| [*m, *l])
            .filter(|id| *id != 0)
            .collect();
        if need
            .iter()
            .any(|id| !self.names.lock().expect("names").contains_key(id))
        {
            self.learn_names(timeout);
        }
        let names = self.names.lock().expect("names").clone();
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, l) in &ok {
            if *l != 0 {
                *votes.entry(*l).or_default() += 1;
            }
        }
        let detail = format!("{} of {} members answered", ok.len(), self.members.len());
        let Some((&leader, _)) = votes.iter().max_by_key(|(_, n)| **n) else {
            return Ok((None, detail));
        };
        Ok((
            Some(
                names
                    .get(&leader)
                    .cloned()
                    .unwrap_or_else(|| format!("{leader:x}")),
            ),
            detail,
        ))
    }

    fn learn_names(&self, timeout: Duration) {
        for i in 0..self.members.len() {
            let r = self.rt.block_on(async {
                let mut c = self.client(i, timeout).await?;
                tokio::time::timeout(timeout, c.member_list())
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| short(&e))
            });
            if let Ok(list) = r {
                let mut names = self.names.lock().expect("names");
                for m in list.members() {
                    names.insert(m.id(), m.name().to_string());
                }
                return;
            }
        }
    }
}
