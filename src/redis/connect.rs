//! How a `RedisSync` connects: to independent masters, or to a Redis
//! Cluster, with the wake-up subscriptions of each mode.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

#[cfg(feature = "cluster")]
use super::cluster;
use super::conn::Conn;
use super::keys::Keys;
use super::node::Node;
use super::state::Waiters;
use super::wakeups;
use crate::error::{Error, Result};

/// What every mode's connections are set up with.
pub(crate) struct Setup<'a> {
    pub(crate) key_prefix: &'a str,
    pub(crate) connect_timeout: Duration,
    pub(crate) replicas: Option<(usize, Duration)>,
    pub(crate) client_id: &'a Arc<str>,
    pub(crate) waiters: &'a Waiters,
}

impl Setup<'_> {
    /// Independent masters: a lazy connection manager each, and one wake-up
    /// subscriber each.
    pub(crate) fn independent_nodes(
        &self,
        clients: Vec<Result<redis::Client>>,
    ) -> Result<(Vec<Node>, wakeups::Wakeups)> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            // Commands are bounded by the per-node timeout instead.
            .set_response_timeout(None)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let clients = clients.into_iter().collect::<Result<Vec<_>>>()?;
        let wakeups = wakeups::NodeWakeups::start(
            &clients,
            Keys::plain(self.key_prefix, "")
                .channel(self.client_id)
                .into(),
            Arc::downgrade(self.waiters),
        );
        let mut nodes = Vec::with_capacity(clients.len());
        for client in clients {
            let label = client.get_connection_info().addr().to_string();
            let connect = |client: redis::Client| {
                ConnectionManager::new_lazy_with_config(client, config.clone())
                    .map(Conn::Single)
                    .map_err(|e| invalid(format!("node {label}"), Some(Box::new(e))))
            };
            let durable = self.replicas.map(|_| connect(client.clone())).transpose()?;
            let conn = connect(client)?;
            nodes.push(Node::new(label, conn, self.replicas, durable));
        }
        Ok((nodes, wakeups::Wakeups::Nodes(wakeups)))
    }

    /// A Redis Cluster: one node to the lock algorithm, whose connection routes
    /// each command to the master of its slot.
    #[cfg(feature = "cluster")]
    pub(crate) fn cluster_node(&self, seeds: Vec<String>) -> Result<(Vec<Node>, wakeups::Wakeups)> {
        if seeds.is_empty() {
            return Err(invalid("no Redis Cluster seed node was given", None));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "on a Redis Cluster the key prefix must be non-empty and hold no brace: \
             the lock key `{<prefix><name>}` is the name's hash tag",
                None,
            ));
        }
        let mut labels = Vec::with_capacity(seeds.len());
        for (i, seed) in seeds.iter().enumerate() {
            let client = redis::Client::open(seed.as_str()).map_err(|e| {
                invalid(
                    format!("cluster seed #{} has an invalid URL", i + 1),
                    Some(Box::new(e)),
                )
            })?;
            labels.push(client.get_connection_info().addr().to_string());
        }
        super::keys::prepare_slot_tags();
        let connections = cluster::connect(&seeds, self.connect_timeout, self.replicas.is_some())
            .map_err(|e| invalid("Redis Cluster seeds", Some(Box::new(e))))?;
        let wakeups = cluster::SlotWakeups::start(
            connections.subscriptions,
            connections.pushes,
            self.client_id.clone(),
            Arc::downgrade(self.waiters),
        );
        let label = format!("cluster({})", labels.join(","));
        Ok((
            vec![Node::new(
                label,
                Conn::Cluster(connections.commands),
                self.replicas,
                connections.durable.map(Conn::Cluster),
            )],
            wakeups::Wakeups::Cluster(wakeups),
        ))
    }
}

/// An [`Error::InvalidConfig`] for `reason`.
pub(crate) fn invalid(reason: impl Into<String>, source: Option<crate::BoxError>) -> Error {
    Error::InvalidConfig {
        reason: reason.into(),
        source,
    }
}
