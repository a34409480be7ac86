//! How the host reaches Iggy and how the topics it creates there are laid out.

/// How the host reaches Iggy.
#[derive(Debug, Clone)]
pub struct IggySettings {
    /// `host:port` of the server's TCP transport.
    pub address: String,
    pub username: String,
    pub password: String,
    pub stream: String,
    /// Partitions of each topic Owlery creates. One by default: every host runs every
    /// plugin over all of a topic's partitions, so more partitions buy no parallelism yet,
    /// and each costs Iggy a request and an fsync per send and the readers a poll per read
    /// (measured end to end at 1,000 events/s, p99: 14-21 ms with one, 27-55 ms with eight).
    pub partitions: u32,
    /// Topics created with one partition instead, for one order over all their events.
    pub single_partition_topics: Vec<String>,
    /// Recent `eventId`s remembered for deduplicating publishes.
    pub dedup_window: u64,
}

impl Default for IggySettings {
    fn default() -> Self {
        IggySettings {
            address: "127.0.0.1:8090".into(),
            username: "iggy".into(),
            password: "iggy".into(),
            stream: "owlery".into(),
            partitions: 1,
            single_partition_topics: Vec::new(),
            dedup_window: 100_000,
        }
    }
}

impl IggySettings {
    /// Partitions of a topic Owlery creates.
    pub(super) fn partitions_of(&self, topic: &str) -> u32 {
        if self.single_partition_topics.iter().any(|t| t == topic) { 1 } else { self.partitions }
    }

    /// The client's connection string: it reconnects forever, once a second.
    pub(super) fn connection_string(&self) -> String {
        format!(
            "iggy://{}:{}@{}?nodelay=true&reconnection_retries=unlimited&reconnection_interval=1s",
            self.username, self.password, self.address
        )
    }
}
