//! Each plugin's key space and its committed offsets: read, reset (replay, purge), and moved
//! from a shadow to its live name (promote).

use std::collections::HashMap;

use redb::ReadableTable;

use super::{OFFSETS, STATE, Store, StoreError};

impl Store {
    pub fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let table = self.read()?.open_table(STATE)?;
        Ok(table.get((plugin, key))?.map(|v| v.value().to_vec()))
    }

    /// Every (key, value) of `plugin` whose key starts with `prefix`, in key order; stops
    /// after `max_bytes` of keys and values (the caller sees it went over by the total).
    pub fn state_scan(
        &self,
        plugin: &str,
        prefix: &str,
        max_bytes: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let table = self.read()?.open_table(STATE)?;
        let mut out = Vec::new();
        let mut taken = 0usize;
        for entry in table.range((plugin, prefix)..)? {
            let (key, value) = entry?;
            let (owner, k) = key.value();
            if owner != plugin || !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_owned(), value.value().to_vec()));
            taken += k.len() + value.value().len();
            if taken > max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The plugin's committed offsets: (topic, partition) → next offset to read.
    pub fn offsets(&self, plugin: &str) -> Result<HashMap<(String, u32), u64>, StoreError> {
        let table = self.read()?.open_table(OFFSETS)?;
        let mut out = HashMap::new();
        for entry in table.range((plugin, "", 0)..)? {
            let (key, value) = entry?;
            let (owner, topic, partition) = key.value();
            if owner != plugin {
                break;
            }
            out.insert((topic.to_owned(), partition), value.value());
        }
        Ok(out)
    }

    /// Drop a plugin's state and offsets (replay from zero, purge).
    pub fn reset_plugin(&self, plugin: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            txn.open_table(STATE)?.retain(|(owner, _), _| owner != plugin)?;
            txn.open_table(OFFSETS)?.retain(|(owner, _, _), _| owner != plugin)?;
        }
        Ok(txn.commit()?)
    }

    /// Make `from`'s state and offsets `to`'s, in one transaction (a shadow's promotion).
    /// `to`'s old state and offsets are dropped, and `from` is left empty.
    pub fn promote_namespace(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut state = txn.open_table(STATE)?;
            state.retain(|(owner, _), _| owner != to)?;
            let moved: Vec<(String, Vec<u8>)> = state
                .range((from, "")..)?
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value().0.to_owned(), k.value().1.to_owned(), v.value().to_vec()))
                .take_while(|(owner, _, _)| owner == from)
                .map(|(_, k, v)| (k, v))
                .collect();
            for (key, value) in &moved {
                state.insert((to, key.as_str()), value.as_slice())?;
            }
            state.retain(|(owner, _), _| owner != from)?;

            let mut offsets = txn.open_table(OFFSETS)?;
            offsets.retain(|(owner, _, _), _| owner != to)?;
            let moved: Vec<(String, u32, u64)> = offsets
                .range((from, "", 0)..)?
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value().0.to_owned(), k.value().1.to_owned(), k.value().2, v.value()))
                .take_while(|(owner, _, _, _)| owner == from)
                .map(|(_, t, p, n)| (t, p, n))
                .collect();
            for (topic, partition, next) in &moved {
                offsets.insert((to, topic.as_str(), *partition), *next)?;
            }
            offsets.retain(|(owner, _, _), _| owner != from)?;
        }
        Ok(txn.commit()?)
    }
}

/// The runtime reads a plugin's committed state through this (it never names the store).
impl crate::runtime::StateView for Store {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, crate::runtime::StateError> {
        self.state_get(namespace, key).map_err(crate::runtime::StateError::new)
    }

    fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        max_bytes: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, crate::runtime::StateError> {
        self.state_scan(namespace, prefix, max_bytes).map_err(crate::runtime::StateError::new)
    }
}
