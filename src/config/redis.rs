//! `[redis]`: where Redis is: one server, a Sentinel-monitored primary, or
//! a Redis Cluster.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[redis]`: where Redis is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    pub connect_timeout_secs: u64,
    pub response_timeout_secs: u64,
    /// PEM file with the CA certificate(s) that sign the server's
    /// certificate, for `rediss://` with a private CA; empty: system roots.
    pub tls_ca_file: String,
    /// Sentinel addresses (`host:port`); non-empty: the master is found
    /// through them, and `url` gives only the credentials and database.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// Seed nodes of a Redis Cluster (`host:port`); non-empty: cluster
    /// mode, and `url` gives only the credentials.
    pub cluster_nodes: Vec<String>,
}

/// Which kind of Redis deployment the configuration points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server at `redis.url`.
    Single,
    /// A primary found through `redis.sentinels`.
    Sentinel,
    /// A Redis Cluster reached through `redis.cluster_nodes`.
    Cluster,
}

impl RedisConfig {
    /// The deployment the settings describe (valid after [`Self::validate`]).
    pub fn topology(&self) -> RedisTopology {
        if !self.cluster_nodes.is_empty() {
            RedisTopology::Cluster
        } else if !self.sentinels.is_empty() {
            RedisTopology::Sentinel
        } else {
            RedisTopology::Single
        }
    }

    /// Checks the URL scheme, that a CA file goes with TLS, and that
    /// Sentinel and Cluster settings are complete and not mixed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        let url = self.url.expose();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            return err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            );
        }
        if !self.tls_ca_file.is_empty() && !url.starts_with("rediss://") {
            return err(
                "redis.tls_ca_file",
                "is set but redis.url does not start with rediss:// (TLS)",
            );
        }
        if !self.sentinels.is_empty() && !self.cluster_nodes.is_empty() {
            return err(
                "redis.sentinels / redis.cluster_nodes",
                "are both set: a deployment is either Sentinel-monitored or a Cluster; keep one",
            );
        }
        if self.topology() == RedisTopology::Single {
            if !self.master_name.is_empty() {
                return err(
                    "redis.master_name",
                    "is set but redis.sentinels is empty: list the sentinels (host:port) or remove master_name",
                );
            }
            return Ok(());
        }
        let (key, nodes) = match self.topology() {
            RedisTopology::Sentinel => ("redis.sentinels", &self.sentinels),
            _ => ("redis.cluster_nodes", &self.cluster_nodes),
        };
        if self.topology() == RedisTopology::Sentinel && self.master_name.is_empty() {
            return err(
                "redis.master_name",
                "must name the master the sentinels monitor (their `sentinel monitor <name> ...`)",
            );
        }
        if !url.starts_with("redis://") {
            return err(
                "redis.url",
                &format!("must be a redis:// URL when {key} is set: TLS (rediss://) and unix sockets are supported with one Redis server only"),
            );
        }
        for node in nodes {
            if parse_host_port(node).is_none() {
                return err(
                    key,
                    &format!("entry {node:?} is not host:port (e.g. 10.0.0.5:26379)"),
                );
            }
        }
        Ok(())
    }
}

/// Splits `host:port` (the form of `redis.sentinels` and
/// `redis.cluster_nodes` entries); `None` when it is not that.
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains('/')).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sentinels: &[&str], master: &str, cluster: &[&str]) -> RedisConfig {
        RedisConfig {
            url: Secret::from("redis://127.0.0.1:6379".to_owned()),
            connect_timeout_secs: 5,
            response_timeout_secs: 5,
            tls_ca_file: String::new(),
            sentinels: sentinels.iter().map(|s| s.to_string()).collect(),
            master_name: master.into(),
            cluster_nodes: cluster.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn topology_follows_which_node_list_is_set() {
        assert_eq!(config(&[], "", &[]).topology(), RedisTopology::Single);
        let s = config(&["127.0.0.1:26379"], "mymaster", &[]);
        s.validate().unwrap();
        assert_eq!(s.topology(), RedisTopology::Sentinel);
        let c = config(&[], "", &["127.0.0.1:7000"]);
        c.validate().unwrap();
        assert_eq!(c.topology(), RedisTopology::Cluster);
    }

    #[test]
    fn incomplete_or_mixed_topologies_are_refused_naming_the_setting() {
        let e = config(&["127.0.0.1:26379"], "", &[])
            .validate()
            .unwrap_err();
        assert!(e.0.contains("redis.master_name"), "{e}");
        let e = config(&[], "mymaster", &[]).validate().unwrap_err();
        assert!(e.0.contains("redis.master_name"), "{e}");
        let e = config(&["a:1"], "m", &["b:2"]).validate().unwrap_err();
        assert!(e.0.contains("both set"), "{e}");
        let e = config(&[], "", &["no-port"]).validate().unwrap_err();
        assert!(e.0.contains("not host:port"), "{e}");
        let mut tls = config(&["a:1"], "m", &[]);
        tls.url = Secret::from("rediss://a:6379".to_owned());
        assert!(tls.validate().unwrap_err().0.contains("rediss://"));
    }

    #[test]
    fn host_port_entries_split_at_the_last_colon() {
        assert_eq!(
            parse_host_port("10.0.0.5:26379"),
            Some(("10.0.0.5".into(), 26379))
        );
        assert_eq!(parse_host_port("redis://h:1"), None);
        assert_eq!(parse_host_port("h"), None);
        assert_eq!(parse_host_port(":1"), None);
    }
}
