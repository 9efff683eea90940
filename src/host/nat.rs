//! The lab's nft table (family inet): NAT for the node subnet and forward rules
//! that accept the bridge's traffic, written with the `nftables` crate (`nft -j`).
//!
//! Ownership: nft 1.0.6 keeps table comments but does not show them in `nft -j`
//! output, so every rule of the table carries the comment `<marker> <fingerprint>`
//! (marker = `kthw-lab:<lab>`). A table of the lab's name without that marker is
//! someone else's and is never touched. The fingerprint (a hash of the wanted
//! rules) makes a re-run a no-op: the table is rewritten only when it differs.
//!
//! Writing is one atomic batch: add table, delete table, add table, chains, rules.
//! Either the whole new table is in place or the old one is untouched.
//!
//! Limitation: an accept in this table does not override a drop in another table
//! (every base chain on a hook must accept). The forward chain never drops, and other
//! tables' policies are left as they are; a foreign forward chain with policy drop is
//! reported as a warning.

use std::borrow::Cow;

use ipnetwork::Ipv4Network;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT,
};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::net::NetError;

/// Chain names inside the lab's table.
pub const FORWARD_CHAIN: &str = "forward";
pub const POSTROUTING_CHAIN: &str = "postrouting";

/// What the lab's table must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabRules {
    pub lab: String,
    /// `kthw-lab:<lab>`, the first word of every rule comment.
    pub marker: String,
    pub table: String,
    pub bridge: String,
    pub subnet: Ipv4Network,
    pub nat: bool,
    /// Masquerade only out of this interface; `None` = out of any but the bridge.
    pub uplink: Option<String>,
}

impl LabRules {
    fn chains(&self) -> Vec<Chain<'static>> {
        let base = |name: &str, ty, hook, prio| Chain {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.to_string()),
            _type: Some(ty),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        };
        let mut v = vec![base(FORWARD_CHAIN, NfChainType::Filter, NfHook::Forward, 0)];
        if self.nat {
            v.push(base(
                POSTROUTING_CHAIN,
                NfChainType::NAT,
                NfHook::Postrouting,
                100,
            ));
        }
        v
    }

    /// (chain, statements) of every rule, in order.
    fn rule_bodies(&self) -> Vec<(&'static str, Vec<Statement<'static>>)> {
        let br = || Expression::String(Cow::Owned(self.bridge.clone()));
        let subnet = || {
            Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(Expression::String(Cow::Owned(
                    self.subnet.network().to_string(),
                ))),
                len: u32::from(self.subnet.prefix()),
            }))
        };
        let mut v = vec![
            // Everything from the bridge, bridge-to-bridge included (br_netfilter
            // shows bridged frames with iif and oif = the bridge).
            (
                FORWARD_CHAIN,
                vec![
                    matches(meta(MetaKey::Iifname), Operator::EQ, br()),
                    counter(),
                    Statement::Accept(None),
                ],
            ),
            // Replies back into the lab.
            (
                FORWARD_CHAIN,
                vec![
                    matches(meta(MetaKey::Oifname), Operator::EQ, br()),
                    matches(
                        Expression::Named(NamedExpression::CT(CT {
                            key: Cow::Borrowed("state"),
                            family: None,
                            dir: None,
                        })),
                        Operator::IN,
                        Expression::List(vec![
                            Expression::String(Cow::Borrowed("established")),
                            Expression::String(Cow::Borrowed("related")),
                        ]),
                    ),
                    counter(),
                    Statement::Accept(None),
                ],
            ),
        ];
        if self.nat {
            let mut m = vec![
                matches(ip_field("saddr"), Operator::EQ, subnet()),
                matches(ip_field("daddr"), Operator::NEQ, subnet()),
                matches(meta(MetaKey::Oifname), Operator::NEQ, br()),
            ];
            if let Some(u) = &self.uplink {
                m.push(matches(
                    meta(MetaKey::Oifname),
                    Operator::EQ,
                    Expression::String(Cow::Owned(u.clone())),
                ));
            }
            m.push(counter());
            m.push(Statement::Masquerade(None));
            v.push((POSTROUTING_CHAIN, m));
        }
        v
    }

    /// A short hash of everything the table holds.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for c in self.chains() {
            h.update(serde_json::to_vec(&c).expect("chain serializes"));
        }
        for (chain, body) in self.rule_bodies() {
            h.update(chain.as_bytes());
            h.update(serde_json::to_vec(&body).expect("rule serializes"));
        }
        hex::encode(&h.finalize()[..6])
    }

    /// The comment every rule carries.
    pub fn comment(&self) -> String {
        format!("{} {}", self.marker, self.fingerprint())
    }

    fn table_obj(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }
    }

    /// The atomic batch that replaces the lab's table with the wanted one.
    pub fn batch(&self) -> Nftables<'static> {
        let mut b = Batch::new();
        b.add(NfListObject::Table(self.table_obj()));
        b.delete(NfListObject::Table(self.table_obj()));
        b.add(NfListObject::Table(self.table_obj()));
        for c in self.chains() {
            b.add(NfListObject::Chain(c));
        }
        let comment = self.comment();
        for (chain, body) in self.rule_bodies() {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Owned(self.table.clone()),
                chain: Cow::Borrowed(chain),
                expr: Cow::Owned(body),
                comment: Some(Cow::Owned(comment.clone())),
                ..Rule::default()
            }));
        }
        b.to_nftables()
    }

    fn rule_count(&self) -> usize {
        self.rule_bodies().len()
    }
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

// ---------------------------------------------------------------------------
// Reading the ruleset. Parsed as plain JSON: a foreign table may hold statements
// the typed schema does not know, and that must not break the lab.

/// The inet tables of the ruleset with their rules' comments.
#[derive(Debug, Default, Clone)]
struct TableView {
    name: String,
    chains: Vec<String>,
    rule_comments: Vec<Option<String>>,
}

/// The error with the tail of nft's stderr, one line.
fn nft_detail(e: &NftablesError) -> String {
    match e {
        NftablesError::NftFailed { stderr, .. } => {
            format!("{e}: {}", tail_lines(stderr, 3))
        }
        _ => e.to_string(),
    }
}

/// `nft -j -f -` with the batch on stdin. Not `helper::apply_ruleset`: that one lets
/// nft's stderr through to ours and reports an empty one, and the error must carry
/// nft's own message.
fn apply(batch: &Nftables, op: &'static str, table: &str) -> Result<(), NetError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let fail = |detail: String| NetError::Nft {
        op,
        table: table.to_string(),
        detail,
    };
    let payload = serde_json::to_vec(batch).expect("batch serializes");
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run nft: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let written = stdin.write_all(&payload);
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("cannot wait for nft: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = tail_lines(&stderr, 3);
    Err(fail(match (tail.is_empty(), written) {
        (false, _) => format!("{}: {tail}", out.status),
        (true, Err(e)) => format!("{}; writing its input failed: {e}", out.status),
        (true, Ok(())) => format!("{} with no message", out.status),
    }))
}

/// The last `n` non-empty lines, joined on one line.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

fn ruleset() -> Result<Value, NetError> {
    let raw = helper::get_current_ruleset_raw(helper::DEFAULT_NFT, helper::DEFAULT_ARGS).map_err(
        |e| NetError::NftList {
            detail: nft_detail(&e),
        },
    )?;
    serde_json::from_str(&raw).map_err(|e| NetError::NftList {
        detail: format!("invalid JSON from nft -j: {e}"),
    })
}

fn objects(rs: &Value) -> impl Iterator<Item = (&str, &Value)> {
    rs.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_object())
        .flat_map(|o| o.iter().map(|(k, v)| (k.as_str(), v)))
}

fn inet_tables(rs: &Value) -> Vec<TableView> {
    let mut tables: Vec<TableView> = Vec::new();
    let is_inet = |v: &Value| v.get("family").and_then(Value::as_str) == Some("inet");
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    for (kind, v) in objects(rs) {
        if !is_inet(v) {
            continue;
        }
        match kind {
            "table" => tables.push(TableView {
                name: str_of(v, "name").unwrap_or_default(),
                ..TableView::default()
            }),
            "chain" | "rule" => {
                let Some(t) = str_of(v, "table") else {
                    continue;
                };
                let Some(tv) = tables.iter_mut().find(|x| x.name == t) else {
                    continue;
                };
                if kind == "chain" {
                    tv.chains.push(str_of(v, "name").unwrap_or_default());
                } else {
                    tv.rule_comments.push(str_of(v, "comment"));
                }
            }
            _ => {}
        }
    }
    tables
}

fn carries_marker(t: &TableView, marker: &str) -> bool {
    t.rule_comments
        .iter()
        .flatten()
        .any(|c| c.split_whitespace().next() == Some(marker))
}

/// Err when an inet table named `table` exists without the lab's marker.
pub fn check_table_owner(table: &str, marker: &str, lab: &str) -> Result<(), NetError> {
    let rs = ruleset()?;
    match inet_tables(&rs).into_iter().find(|t| t.name == table) {
        Some(t) if !carries_marker(&t, marker) => Err(NetError::TableNotOwned {
            table: table.to_string(),
            lab: lab.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Write the lab's table unless it is already exactly as wanted. Returns whether it
/// was written.
pub fn ensure_table(rules: &LabRules) -> Result<bool, NetError> {
    let rs = ruleset()?;
    let comment = rules.comment();
    if let Some(t) = inet_tables(&rs).into_iter().find(|t| t.name == rules.table) {
        if !carries_marker(&t, &rules.marker) {
            return Err(NetError::TableNotOwned {
                table: rules.table.clone(),
                lab: rules.lab.clone(),
            });
        }
        let wanted_chains: Vec<String> =
            rules.chains().iter().map(|c| c.name.to_string()).collect();
        let up_to_date = t.rule_comments.len() == rules.rule_count()
            && t.rule_comments
                .iter()
                .all(|c| c.as_deref() == Some(&comment))
            && t.chains == wanted_chains;
        if up_to_date {
            return Ok(false);
        }
    }
    apply(&rules.batch(), "write", &rules.table)?;
    Ok(true)
}

/// The inet tables whose rules carry `marker`.
pub fn owned_tables(marker: &str) -> Result<Vec<String>, NetError> {
    let rs = ruleset()?;
    Ok(inet_tables(&rs)
        .into_iter()
        .filter(|t| carries_marker(t, marker))
        .map(|t| t.name)
        .collect())
}

/// Delete every inet table whose rules carry `marker`, in one batch.
pub fn remove_tables(marker: &str) -> Result<Vec<String>, NetError> {
    let names = owned_tables(marker)?;
    if names.is_empty() {
        return Ok(names);
    }
    let mut b = Batch::new();
    for n in &names {
        b.delete(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(n.clone()),
            handle: None,
        }));
    }
    apply(&b.to_nftables(), "delete", &names.join(","))?;
    Ok(names)
}

/// Base chains of other ip/inet tables on the forward hook with policy drop: they
/// drop the lab's routed traffic whatever our table accepts.
pub fn foreign_forward_drop_warnings(own_table: &str) -> Result<Vec<String>, NetError> {
    let rs = ruleset()?;
    Ok(forward_drop_chains(&rs, own_table)
        .into_iter()
        .map(|(fam, t, c)| {
            format!(
                "chain {fam} {t} {c} drops forwarded packets by default: accept the lab's \
                 bridge there (an accept in table inet {own_table} does not override it)"
            )
        })
        .collect())
}

fn forward_drop_chains(rs: &Value, own_table: &str) -> Vec<(String, String, String)> {
    objects(rs)
        .filter(|(k, _)| *k == "chain")
        .map(|(_, v)| v)
        .filter(|v| v.get("hook").and_then(Value::as_str) == Some("forward"))
        .filter(|v| v.get("policy").and_then(Value::as_str) == Some("drop"))
        .filter_map(|v| {
            let fam = v.get("family")?.as_str()?;
            let table = v.get("table")?.as_str()?;
            let name = v.get("name")?.as_str()?;
            let ours = fam == "inet" && table == own_table;
            (matches!(fam, "ip" | "inet") && !ours)
                .then(|| (fam.to_string(), table.to_string(), name.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(uplink: Option<&str>) -> LabRules {
        LabRules {
            lab: "t".into(),
            marker: "kthw-lab:t".into(),
            table: "kthw_t".into(),
            bridge: "br0".into(),
            subnet: "10.200.1.0/24".parse().unwrap(),
            nat: true,
            uplink: uplink.map(str::to_string),
        }
    }

    #[test]
    fn batch_replaces_the_table_atomically() {
        let j = serde_json::to_value(rules(Some("eth0")).batch()).unwrap();
        let cmds = j["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["table"]["name"], "kthw_t");
        assert_eq!(cmds[1]["delete"]["table"]["name"], "kthw_t");
        assert_eq!(cmds[2]["add"]["table"]["family"], "inet");
        assert_eq!(cmds[3]["add"]["chain"]["hook"], "forward");
        assert_eq!(cmds[3]["add"]["chain"]["policy"], "accept");
        assert_eq!(cmds[4]["add"]["chain"]["type"], "nat");
        // Never a drop anywhere in our table.
        assert!(!j.to_string().contains("\"drop\""));
        let rules: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("rule")).collect();
        assert_eq!(rules.len(), 3);
        for r in &rules {
            assert!(r["comment"].as_str().unwrap().starts_with("kthw-lab:t "));
        }
        let masq = rules[2]["expr"].to_string();
        assert!(masq.contains("\"masquerade\""));
        assert!(masq.contains("\"eth0\""));
        assert!(masq.contains("10.200.1.0"));
    }

    #[test]
    fn fingerprint_follows_content() {
        assert_eq!(rules(None).fingerprint(), rules(None).fingerprint());
        assert_ne!(rules(None).fingerprint(), rules(Some("eth0")).fingerprint());
        let mut no_nat = rules(None);
        no_nat.nat = false;
        assert_ne!(no_nat.fingerprint(), rules(None).fingerprint());
        assert_eq!(no_nat.rule_count(), 2);
    }

    #[test]
    fn ownership_is_the_first_word_of_a_comment() {
        let rs: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},
            {"table":{"family":"inet","name":"kthw_a","handle":1}},
            {"chain":{"family":"inet","table":"kthw_a","name":"forward","hook":"forward","policy":"accept"}},
            {"rule":{"family":"inet","table":"kthw_a","chain":"forward","comment":"kthw-lab:a 0123"}},
            {"table":{"family":"inet","name":"kthw_ab","handle":2}},
            {"rule":{"family":"inet","table":"kthw_ab","chain":"forward","comment":"kthw-lab:ab 0123"}},
            {"table":{"family":"ip","name":"filter","handle":3}},
            {"chain":{"family":"ip","table":"filter","name":"FORWARD","hook":"forward","policy":"drop"}}]}"#,
        )
        .unwrap();
        let t = inet_tables(&rs);
        assert_eq!(t.len(), 2);
        assert!(carries_marker(&t[0], "kthw-lab:a"));
        assert!(!carries_marker(&t[1], "kthw-lab:a"));
        assert_eq!(
            forward_drop_chains(&rs, "kthw_a"),
            vec![("ip".into(), "filter".into(), "FORWARD".into())]
        );
    }
}
