//! The `state` capability: a plugin's key-value state, read through a [`StateView`] (the
//! host's store implements it; the runtime never names it) with the call's own writes
//! buffered on top, so a plugin reads what it wrote before the batch is committed.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Committed plugin state, as the runtime sees it: reads only, per namespace (a plugin's
/// name, or a shadow's own key space). Writes reach the store as `Effects`, committed with
/// the batch's offsets.
pub trait StateView: Send + Sync {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Every (key, value) of `namespace` whose key starts with `prefix`, in key order;
    /// it may stop once past `max_bytes` of keys and values.
    fn scan(&self, namespace: &str, prefix: &str, max_bytes: usize) -> Result<Vec<(String, Vec<u8>)>, StateError>;
}

/// Why the state behind a `StateView` could not be read: the implementation's own error,
/// shown as it is (a plugin call that hits it traps with that message).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StateError(Box<dyn std::error::Error + Send + Sync>);

impl StateError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> StateError {
        StateError(Box::new(error))
    }
}

/// (key, value) pairs of a scan, in key order.
pub(super) type Entries = Vec<(String, Vec<u8>)>;

/// One instance's view of its namespace: committed state plus the current call's writes.
pub(super) struct StateAccess {
    namespace: Arc<str>,
    view: Arc<dyn StateView>,
    /// key → new value, or `None` for a delete; taken as the call's `Effects`
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl StateAccess {
    pub(super) fn new(namespace: Arc<str>, view: Arc<dyn StateView>) -> StateAccess {
        StateAccess { namespace, view, writes: BTreeMap::new() }
    }

    pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        self.view.get(&self.namespace, key)
    }

    /// Buffer a write (`None`: a delete).
    pub(super) fn write(&mut self, key: String, value: Option<Vec<u8>>) {
        self.writes.insert(key, value);
    }

    /// What `scan` of `prefix` sees, or `None` when the committed part alone is over
    /// `max_bytes` (the host never holds more than that for one scan).
    pub(super) fn scan(&self, prefix: &str, max_bytes: usize) -> Result<Option<Entries>, StateError> {
        let committed = self.view.scan(&self.namespace, prefix, max_bytes)?;
        if committed.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > max_bytes {
            return Ok(None);
        }
        let mut merged: BTreeMap<String, Vec<u8>> = committed.into_iter().collect();
        for (key, value) in self.writes.range(prefix.to_owned()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(v) => merged.insert(key.clone(), v.clone()),
                None => merged.remove(key),
            };
        }
        Ok(Some(merged.into_iter().collect()))
    }

    pub(super) fn discard_writes(&mut self) {
        self.writes.clear();
    }

    pub(super) fn take_writes(&mut self) -> BTreeMap<String, Option<Vec<u8>>> {
        std::mem::take(&mut self.writes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::{StateAccess, StateError, StateView};

    /// Committed state of one namespace, in memory: the runtime needs nothing more.
    struct Committed(BTreeMap<String, Vec<u8>>);

    impl StateView for Committed {
        fn get(&self, _: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
            Ok(self.0.get(key).cloned())
        }
        fn scan(&self, _: &str, prefix: &str, _: usize) -> Result<Vec<(String, Vec<u8>)>, StateError> {
            Ok(self.0.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
    }

    #[test]
    fn a_call_reads_its_own_writes_over_committed_state() {
        let committed = [("a/1", "old"), ("a/2", "gone"), ("b/1", "other")];
        let view = Committed(committed.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect());
        let mut state = StateAccess::new("p".into(), Arc::new(view));
        state.write("a/1".into(), Some(b"new".to_vec()));
        state.write("a/2".into(), None);
        state.write("a/3".into(), Some(b"added".to_vec()));

        assert_eq!(state.get("a/1").unwrap(), Some(b"new".to_vec()));
        assert_eq!(state.get("a/2").unwrap(), None);
        assert_eq!(state.get("b/1").unwrap(), Some(b"other".to_vec()));
        let keys: Vec<String> = state.scan("a/", 1 << 20).unwrap().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a/1", "a/3"]);
        assert!(state.scan("", 4).unwrap().is_none(), "over the byte cap: refused, not held");

        assert_eq!(state.take_writes().len(), 3);
        assert_eq!(state.get("a/1").unwrap(), Some(b"old".to_vec()), "taken writes are no longer read");
    }
}
