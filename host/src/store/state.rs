//! Each plugin's key space and its committed offsets: read, reset (replay, purge), and moved
//! from a shadow to its live name (promote).

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable};

use super::{OFFSETS, PROMOTIONS, REPLAYS, STATE, Store, StoreError};

/// (topic, partition, offset)
pub type PartitionOffset = (String, u32, u64);

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

    /// Bytes of `plugin`'s state, keys and values (read through once: for a scrape, not a
    /// hot path).
    pub fn state_bytes(&self, plugin: &str) -> Result<u64, StoreError> {
        let table = self.read()?.open_table(STATE)?;
        let mut bytes = 0u64;
        for entry in table.range((plugin, "")..)? {
            let (key, value) = entry?;
            let (owner, k) = key.value();
            if owner != plugin {
                break;
            }
            bytes += (k.len() + value.value().len()) as u64;
        }
        Ok(bytes)
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

    /// Drop a plugin's state, offsets and replay (purge, a fresh shadow).
    pub fn reset_plugin(&self, plugin: &str) -> Result<(), StoreError> {
        self.start_replay(plugin, &[], &[])
    }

    /// In one transaction: drop the plugin's state, set its offsets to `start`, and keep
    /// `target` as its replay under way (none if empty). A crash leaves either the old
    /// plugin or the reset one with its replay, never a reset without its offsets.
    pub fn start_replay(
        &self,
        plugin: &str,
        start: &[PartitionOffset],
        target: &[PartitionOffset],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            txn.open_table(STATE)?.retain(|(owner, _), _| owner != plugin)?;
            let mut offsets = txn.open_table(OFFSETS)?;
            offsets.retain(|(owner, _, _), _| owner != plugin)?;
            for (topic, partition, next) in start {
                offsets.insert((plugin, topic.as_str(), *partition), *next)?;
            }
            let mut replays = txn.open_table(REPLAYS)?;
            if target.is_empty() {
                replays.remove(plugin)?;
            } else {
                replays.insert(plugin, serde_json::to_vec(target)?.as_slice())?;
            }
        }
        Ok(txn.commit()?)
    }

    /// The plugin's replay under way, if any (see `start_replay`).
    pub fn replay(&self, plugin: &str) -> Result<Option<Vec<PartitionOffset>>, StoreError> {
        let table = self.read()?.open_table(REPLAYS)?;
        let Some(value) = table.get(plugin)? else { return Ok(None) };
        Ok(Some(serde_json::from_slice(value.value())?))
    }

    /// Keep `target` as the plugin's replay under way (after a promotion), or none.
    pub fn set_replay(&self, plugin: &str, target: Option<&[PartitionOffset]>) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut replays = txn.open_table(REPLAYS)?;
            match target {
                Some(target) => {
                    replays.insert(plugin, serde_json::to_vec(target)?.as_slice())?;
                }
                None => {
                    replays.remove(plugin)?;
                }
            }
        }
        Ok(txn.commit()?)
    }

    /// Make `from`'s state and offsets `to`'s, in one transaction (a shadow's promotion).
    /// `to`'s old state and offsets are dropped, and `from` is left empty. `version` (the
    /// promoted component and manifest, as the registry encodes them) is kept in the same
    /// transaction until `promotion_saved`: a host that dies before the plugins directory
    /// holds the new files writes them at start, so the promoted state never runs under the
    /// old version.
    pub fn promote_namespace(
        &self,
        from: &str,
        to: &str,
        handled: &[PartitionOffset],
        version: &[u8],
    ) -> Result<Option<Vec<PartitionOffset>>, StoreError> {
        let txn = self.db.begin_write()?;
        let behind: Vec<PartitionOffset>;
        {
            txn.open_table(PROMOTIONS)?.insert(to, version)?;
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
            // A replay either had under way is not the promoted state's; the promoted state
            // replays, quietly, what `to` had handled beyond it (a partition it never read
            // counts as read from zero).
            let mut replays = txn.open_table(REPLAYS)?;
            replays.remove(to)?;
            replays.remove(from)?;
            behind = handled
                .iter()
                .filter(|(topic, partition, old)| {
                    let new = moved.iter().find(|(t, p, _)| t == topic && p == partition).map_or(0, |m| m.2);
                    new < *old
                })
                .cloned()
                .collect();
            if !behind.is_empty() {
                replays.insert(to, serde_json::to_vec(&behind)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok((!behind.is_empty()).then_some(behind))
    }
}

impl Store {
    /// Promotions committed whose files may not be in the plugins directory yet: (plugin,
    /// its version as `promote_namespace` was given it).
    pub fn promotions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROMOTIONS)?;
        let mut all = Vec::new();
        for entry in table.iter()? {
            let (name, version) = entry?;
            all.push((name.value().to_owned(), version.value().to_vec()));
        }
        Ok(all)
    }

    /// The promoted version of `plugin` is in the plugins directory.
    pub fn promotion_saved(&self, plugin: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PROMOTIONS)?.remove(plugin)?;
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
