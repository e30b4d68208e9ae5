//! Unit bodies by hash: read from the store once, parsed once.
//!
//! A body is stored under its content address ([`super::keys::body`]), so
//! the text under a hash never changes, and neither does anything parsed from
//! it. The scheduler (the `[X-Fleet]` rules of every unit it places), the
//! agent (the rules of what it claims, the text of what it loads), the API
//! (the options it shows) and the reboot coordinator (the rules of the units
//! it drains) share one [`BodyCache`] per daemon (built in
//! [`crate::daemon`]) rather than fetching and parsing on their own terms;
//! a user operation that needs a template's body for its instances reads it
//! through a cache of its own call.
//!
//! A template's instances share its body (and hash) but not always its rules
//! (`%i` expands to each instance's name), so a [`Body`] works out the rules
//! per unit name beside the one parsed file; rules that come out equal for
//! several names are kept once and shared ([`Body::requirements`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use super::error::RegistryError;
use super::keys;
use super::records::UnitRecord;
use crate::consensus::client::{Client, ClientError};
use crate::units::{self, Requirements, Unit, UnitFile, UnitHash, UnitName};

/// One stored body: its text, parsed on first use.
#[derive(Debug)]
pub struct Body {
    text: String,
    file: OnceLock<Result<UnitFile, units::Error>>,
    /// The `[X-Fleet]` rules of each unit name that asked, checked once.
    requirements: Mutex<Rules>,
}

/// The rules a body gave each unit name, and the distinct ones among them.
#[derive(Debug, Default)]
struct Rules {
    by_name: HashMap<UnitName, Result<Arc<Requirements>, units::Error>>,
    /// The last few distinct rules given, which an equal result shares:
    /// the instances of a template whose rules do not name the instance
    /// all get the same rules, kept once instead of once per unit (at
    /// 100,000 instances of one template, the scheduler's world held
    /// 100,000 copies, 25 MiB of the Raft leader's heap besides the world's
    /// own copy of each; issue 14).
    distinct: Vec<Arc<Requirements>>,
}

/// How many distinct rules a body remembers for sharing.
const DISTINCT: usize = 4;

impl Rules {
    /// `found`, or an equal one already given out.
    fn share(&mut self, found: Requirements) -> Arc<Requirements> {
        if let Some(same) = self.distinct.iter().find(|r| ***r == found) {
            return same.clone();
        }
        let found = Arc::new(found);
        if self.distinct.len() == DISTINCT {
            self.distinct.remove(0);
        }
        self.distinct.push(found.clone());
        found
    }
}

impl Body {
    fn new(text: String) -> Body {
        Body {
            text,
            file: OnceLock::new(),
            requirements: Mutex::new(Rules::default()),
        }
    }

    /// The text as stored: the canonical form, what `flotilla cat` prints.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed unit file.
    pub fn file(&self) -> Result<&UnitFile, &units::Error> {
        self.file
            .get_or_init(|| UnitFile::parse(&self.text))
            .as_ref()
    }

    /// The text an agent writes for a unit whose record names `hash`: the
    /// canonical form of this body, checked to hash to `hash`. A body is
    /// stored under its own hash by the API, but whoever could write the
    /// store directly could store any text under any hash; an agent loads
    /// only what it verified, and writes exactly the form it verified.
    pub fn verified_text(&self, hash: &UnitHash) -> Result<String, String> {
        let file = self
            .file()
            .map_err(|e| format!("the body stored under {hash} does not parse: {e}"))?;
        if file.hash() != *hash {
            return Err(format!(
                "the body stored under {hash} hashes to {}; refusing it",
                file.hash()
            ));
        }
        Ok(file.to_text())
    }

    /// The unit `name` with this body, checked as `flotilla submit` checks one.
    pub fn unit(&self, name: &UnitName) -> Result<Unit, units::Error> {
        Unit::from_file(name, self.file().map_err(Clone::clone)?.clone())
    }

    /// The `[X-Fleet]` rules of unit `name` with this body; worked out once
    /// per name, and the same `Arc` for names whose rules are equal.
    pub fn requirements(&self, name: &UnitName) -> Result<Arc<Requirements>, units::Error> {
        let mut known = self.requirements.lock().expect("body rules lock");
        if let Some(rules) = known.by_name.get(name) {
            return rules.clone();
        }
        let rules = self
            .unit(name)
            .map(|unit| known.share(unit.requirements().clone()));
        known.by_name.insert(name.clone(), rules.clone());
        rules
    }
}

/// Bodies already read, by hash. Shared by reference between tasks: a miss
/// reads the store without holding the lock.
#[derive(Debug, Default)]
pub struct BodyCache {
    bodies: Mutex<HashMap<UnitHash, Arc<Body>>>,
}

impl BodyCache {
    /// An empty cache.
    pub fn new() -> BodyCache {
        BodyCache::default()
    }

    /// The body stored under `hash`, read from the store on first use;
    /// `None` while the store has none (not remembered: it may be written).
    ///
    /// A body's key is its content's hash, so whatever a member holds under
    /// it is the body: it is first read from the member's own state, without
    /// a linearizable round (one per unit an agent is proposed, and per
    /// start call), and only a member that does not hold it yet is asked
    /// again linearizably.
    pub async fn get(
        &self,
        client: &Client,
        hash: &UnitHash,
    ) -> Result<Option<Arc<Body>>, ClientError> {
        if let Some(body) = self.lock().get(hash) {
            return Ok(Some(body.clone()));
        }
        let key = keys::body(hash);
        let (local, _) = client.range(&key, false, true).await?;
        let found = match local.into_iter().next() {
            Some(kv) => Some(kv),
            None => client.get(&key).await?,
        };
        Ok(found.map(|kv| self.insert(*hash, &kv.value)))
    }

    /// The body of the unit `record`; a body gone from the store means the
    /// unit was destroyed meanwhile: [`RegistryError::NoSuchUnit`].
    pub async fn of(
        &self,
        client: &Client,
        record: &UnitRecord,
    ) -> Result<Arc<Body>, RegistryError> {
        self.get(client, &record.hash)
            .await?
            .ok_or_else(|| RegistryError::NoSuchUnit(record.name.clone()))
    }

    /// Remembers the stored text of the body under `hash` and returns the
    /// body held for it (one already held keeps its parsed rules): the
    /// scheduler's view fills the cache from the store's watch this way,
    /// without a read of its own.
    pub fn insert(&self, hash: UnitHash, text: &[u8]) -> Arc<Body> {
        self.lock()
            .entry(hash)
            .or_insert_with(|| Arc::new(Body::new(String::from_utf8_lossy(text).into_owned())))
            .clone()
    }

    /// Forgets the body under `hash` (deleted from the store).
    pub fn remove(&self, hash: &UnitHash) {
        self.lock().remove(hash);
    }

    /// How many bodies are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no body is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets every body whose hash is not in `live` (units destroyed or
    /// replaced), so a long-running cache holds only what is still stored.
    pub fn keep_only(&self, live: &HashSet<UnitHash>) {
        self.lock().retain(|hash, _| live.contains(hash));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UnitHash, Arc<Body>>> {
        self.bodies.lock().expect("body cache lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    #[test]
    fn instances_share_the_file_but_not_the_rules() {
        let body = Body::new(
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineOf=app@%i.service\n".into(),
        );
        let one = body.requirements(&name("side@1.service")).unwrap();
        let two = body.requirements(&name("side@2.service")).unwrap();
        assert_eq!(one.machine_of[0].as_str(), "app@1.service");
        assert_eq!(two.machine_of[0].as_str(), "app@2.service");
        assert!(Arc::ptr_eq(
            &one,
            &body.requirements(&name("side@1.service")).unwrap()
        ));
        assert_eq!(
            body.unit(&name("side@1.service")).unwrap().hash(),
            body.file().unwrap().hash()
        );
    }

    /// Instances whose rules do not name them share one copy of the rules;
    /// rules that differ are not shared, even after many others.
    #[test]
    fn equal_rules_are_kept_once() {
        let body =
            Body::new("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nConflicts=db@*\n".into());
        let first = body.requirements(&name("web@1.service")).unwrap();
        for i in 2..50 {
            let rules = body
                .requirements(&name(&format!("web@{i}.service")))
                .unwrap();
            assert!(Arc::ptr_eq(&first, &rules), "instance {i}");
        }
        assert_eq!(first.conflicts[0].as_str(), "db@*");
        let own = Body::new(
            "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineOf=app@%i.service\n".into(),
        );
        let rules: Vec<_> = (1..10)
            .map(|i| {
                own.requirements(&name(&format!("side@{i}.service")))
                    .unwrap()
            })
            .collect();
        for (i, r) in rules.iter().enumerate() {
            assert_eq!(r.machine_of[0].as_str(), format!("app@{}.service", i + 1));
        }
        assert!(!Arc::ptr_eq(&rules[0], &rules[1]));
    }

    #[test]
    fn a_body_is_loaded_only_under_its_own_hash() {
        let text = "[Service]\nExecStart=/bin/true\n";
        let good = Body::new(text.into());
        let hash = good.file().unwrap().hash();
        assert_eq!(good.verified_text(&hash).unwrap(), text);
        let forged = Body::new("[Service]\nExecStart=/bin/evil\n".into());
        let err = forged.verified_text(&hash).unwrap_err();
        assert!(err.contains("refusing"), "{err}");
        assert!(Body::new("garbage".into()).verified_text(&hash).is_err());
    }

    #[test]
    fn bad_bodies_stay_bad() {
        let body = Body::new("no section\n".into());
        assert!(body.file().is_err());
        assert!(body.requirements(&name("a.service")).is_err());
        assert_eq!(body.text(), "no section\n");
        let rules = Body::new(
            "[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\nReplaces=b*\n".into(),
        );
        assert!(rules.file().is_ok(), "the file parses");
        assert!(
            rules.requirements(&name("a.service")).is_err(),
            "its rules do not"
        );
    }
}
