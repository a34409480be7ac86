//! Offsets per partition: `TopicPartition` names a partition, `Offsets` maps partitions to
//! an offset. One type serves a runner's positions (the next offset to read), a replay's
//! start and target, and the status view, which shows it as `{"topic": {"partition": n}}`.
//! The store keeps its own shapes; the conversions to and from them are here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The JSON shape: topic → partition → offset.
type Nested = BTreeMap<String, BTreeMap<u32, u64>>;

/// An offset per partition, ordered by topic, then partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Nested", into = "Nested")]
pub struct Offsets(BTreeMap<TopicPartition, u64>);

impl Offsets {
    pub fn get(&self, tp: &TopicPartition) -> Option<u64> {
        self.0.get(tp).copied()
    }

    pub fn contains(&self, tp: &TopicPartition) -> bool {
        self.0.contains_key(tp)
    }

    pub fn insert(&mut self, tp: TopicPartition, offset: u64) {
        self.0.insert(tp, offset);
    }

    /// Move `tp` forward to `next`, never back.
    pub fn advance(&mut self, tp: &TopicPartition, next: u64) {
        match self.0.get_mut(tp) {
            Some(position) => *position = (*position).max(next),
            None => {
                self.0.insert(tp.clone(), next);
            }
        }
    }

    /// Keep only the partitions `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&TopicPartition) -> bool) {
        self.0.retain(|tp, _| keep(tp));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, u64)> {
        self.0.iter().map(|(tp, offset)| (tp, *offset))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The shape `BatchCommit::offsets` takes.
    pub fn to_commit(&self) -> Vec<(String, u32, u64)> {
        self.iter().map(|(tp, offset)| (tp.topic.clone(), tp.partition, offset)).collect()
    }
}

impl FromIterator<(TopicPartition, u64)> for Offsets {
    fn from_iter<I: IntoIterator<Item = (TopicPartition, u64)>>(iter: I) -> Self {
        Offsets(iter.into_iter().collect())
    }
}

/// What `Store::offsets` returns.
impl From<HashMap<(String, u32), u64>> for Offsets {
    fn from(stored: HashMap<(String, u32), u64>) -> Self {
        stored.into_iter().map(|((topic, partition), offset)| (TopicPartition::new(topic, partition), offset)).collect()
    }
}

impl From<Nested> for Offsets {
    fn from(nested: Nested) -> Self {
        nested
            .into_iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .into_iter()
                    .map(move |(partition, offset)| (TopicPartition::new(topic.clone(), partition), offset))
            })
            .collect()
    }
}

impl From<Offsets> for Nested {
    fn from(offsets: Offsets) -> Self {
        let mut nested = Nested::new();
        for (tp, offset) in offsets.0 {
            nested.entry(tp.topic).or_default().insert(tp.partition, offset);
        }
        nested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_topic_then_partition() {
        let offsets: Offsets =
            [(TopicPartition::new("b", 1), 7), (TopicPartition::new("a", 0), 3), (TopicPartition::new("b", 0), 5)]
                .into_iter()
                .collect();
        let json = serde_json::to_value(&offsets).unwrap();
        assert_eq!(json, serde_json::json!({"a": {"0": 3}, "b": {"0": 5, "1": 7}}));
        let back: Offsets = serde_json::from_value(json).unwrap();
        assert_eq!(back, offsets);
    }

    #[test]
    fn advancing_never_goes_back() {
        let tp = TopicPartition::new("t", 0);
        let mut offsets = Offsets::default();
        offsets.advance(&tp, 5);
        offsets.advance(&tp, 3);
        assert_eq!(offsets.get(&tp), Some(5));
        assert_eq!(offsets.to_commit(), vec![("t".to_owned(), 0, 5)]);
    }
}
