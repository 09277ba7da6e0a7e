//! Stream shards: the stream and dead-letter keys producers write to and
//! the worker reads from.
//!
//! With `stream.shards = 1` outside a Redis Cluster the keys are the
//! configured `stream.key` and `dlq.key`, unchanged. With more shards, or on
//! a cluster, shard `k` is `<stream.key>:{k}` and its dead letters
//! `<dlq.key>:{k}`: the braces are a hash tag, so a shard's stream, its
//! dead letters and its `:excused` hash share one cluster slot, and the
//! read script and the acknowledging MULTI/EXEC, which touch them
//! together, run on one node.

use crate::config::{Config, RedisTopology};

/// The keys of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardKeys {
    /// The shard's number, 0-based.
    pub index: u32,
    /// The stream producers XADD this shard's events to.
    pub stream: String,
    /// The stream this shard's dead letters go to.
    pub dlq: String,
}

/// Every shard's keys for this configuration.
pub fn shard_keys(config: &Config) -> Vec<ShardKeys> {
    keys(
        &config.stream.key,
        &config.dlq.key,
        config.stream.shards,
        hash_tagged(config),
    )
}

/// Whether keys carry hash tags: more than one shard, or a cluster (where
/// an untagged stream and DLQ would fall in different slots).
pub fn hash_tagged(config: &Config) -> bool {
    config.stream.shards > 1 || config.redis.topology() == RedisTopology::Cluster
}

/// The stream the worker XADDs its own audit events to (exports, reports,
/// snapshots): shard 0's, which every worker reads.
pub fn own_events_key(config: &Config) -> String {
    shard_keys(config).swap_remove(0).stream
}

/// The keys of `shards` shards of `stream` and `dlq`; untagged (the bare
/// names) only for one shard without `tagged`.
pub fn keys(stream: &str, dlq: &str, shards: u32, tagged: bool) -> Vec<ShardKeys> {
    if shards <= 1 && !tagged {
        return vec![ShardKeys {
            index: 0,
            stream: stream.to_owned(),
            dlq: dlq.to_owned(),
        }];
    }
    (0..shards.max(1))
        .map(|k| ShardKeys {
            index: k,
            stream: tagged_key(stream, k),
            dlq: tagged_key(dlq, k),
        })
        .collect()
}

/// `<base>:{k}`: shard `k` of `base`, hash-tagged.
pub fn tagged_key(base: &str, shard: u32) -> String {
    format!("{base}:{{{shard}}}")
}

/// The streams notifications to requesters go to (`export.notifications_key`).
///
/// They follow the shards' hash-tag rule: with one shard outside a cluster
/// there is one stream, `export.notifications_key` itself; otherwise the
/// notifications for requester `r` go to `<notifications_key>:{k}` with
/// `k = shard_for(r, shards)`, so they spread over the cluster's slots as
/// the events do, and one requester's notifications stay in one stream, in
/// order, at a name the requester can compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationKeys {
    base: String,
    shards: u32,
    tagged: bool,
}

impl NotificationKeys {
    /// The notification streams of `config`.
    pub fn new(config: &Config) -> Self {
        Self::with(
            &config.export.notifications_key,
            config.stream.shards,
            hash_tagged(config),
        )
    }

    /// The notification streams of `shards` shards of `base`.
    pub fn with(base: &str, shards: u32, tagged: bool) -> Self {
        Self {
            base: base.to_owned(),
            shards: shards.max(1),
            tagged,
        }
    }

    /// The stream `requester`'s notifications go to.
    pub fn for_requester(&self, requester: &str) -> String {
        if self.tagged {
            tagged_key(&self.base, shard_for(requester, self.shards))
        } else {
            self.base.clone()
        }
    }
}

/// The shard a producer would choose for an organisation: 32-bit FNV-1a
/// of its UTF-8 bytes, modulo `shards`. Any stable hash keeps one
/// organisation's events in one shard, hence in order; this one is a few
/// lines in any language (README, "Sharded streams").
pub fn shard_for(organization_id: &str, shards: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in organization_id.as_bytes() {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_outside_a_cluster_keeps_the_configured_names() {
        let k = keys("audit:events", "audit:dlq", 1, false);
        assert_eq!(
            k,
            vec![ShardKeys {
                index: 0,
                stream: "audit:events".into(),
                dlq: "audit:dlq".into()
            }]
        );
    }

    #[test]
    fn shards_and_their_dead_letters_share_a_hash_tag() {
        let k = keys("audit:events", "audit:dlq", 4, true);
        let names: Vec<_> = k
            .iter()
            .map(|s| (s.stream.as_str(), s.dlq.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("audit:events:{0}", "audit:dlq:{0}"),
                ("audit:events:{1}", "audit:dlq:{1}"),
                ("audit:events:{2}", "audit:dlq:{2}"),
                ("audit:events:{3}", "audit:dlq:{3}"),
            ]
        );
        // One shard on a cluster is tagged too.
        assert_eq!(keys("s", "d", 1, true)[0].stream, "s:{0}");
    }

    #[test]
    fn notifications_follow_the_hash_tag_rule_by_requester() {
        let one = NotificationKeys::with("audit:notifications", 1, false);
        assert_eq!(one.for_requester("alice"), "audit:notifications");
        let four = NotificationKeys::with("n", 4, true);
        let k = shard_for("alice", 4);
        assert_eq!(four.for_requester("alice"), format!("n:{{{k}}}"));
        assert_eq!(
            four.for_requester("bob"),
            format!("n:{{{}}}", shard_for("bob", 4))
        );
        // A cluster with one shard tags its one stream too.
        let cluster = NotificationKeys::with("n", 1, true);
        assert_eq!(cluster.for_requester("anyone"), "n:{0}");
    }

    #[test]
    fn organisations_map_to_a_stable_shard_in_range() {
        // The published FNV-1a 32 test vector: "a" hashes to 0xe40c292c.
        assert_eq!(shard_for("a", u32::MAX), 0xe40c_292c);
        for org in ["org-1", "org-2", "acme", ""] {
            let s = shard_for(org, 4);
            assert!(s < 4);
            assert_eq!(s, shard_for(org, 4));
        }
        assert_eq!(shard_for("anything", 1), 0);
    }
}
