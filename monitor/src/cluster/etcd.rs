//! A blocking face on etcd-client: bdctl's monitors are plain threads, so
//! each call runs on a one-worker tokio runtime under a timeout (a cut-off
//! etcd costs a caller the timeout, never a hang).

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnResponse,
};

/// Errors talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client or the server said no.
    #[error("etcd")]
    Client(#[from] etcd_client::Error),
    /// No answer in time (cut off, or etcd down).
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// The runtime could not start.
    #[error("starting the etcd client's runtime")]
    Runtime(#[source] std::io::Error),
    /// A value that is not what bdctl wrote.
    #[error("etcd key {key}: {detail}")]
    Value {
        /// The key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// One key as read, relative to the cluster's prefix.
#[derive(Debug, Clone)]
pub struct Kv {
    /// The key without the prefix.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A connection to etcd under a key prefix.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects to `endpoints` (http://host:port); keys live under `prefix`.
    pub fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, EtcdError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bdctl-etcd")
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(timeout, timeout);
        let client = rt.block_on(async {
            tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
                .await
                .map_err(|_| EtcdError::Timeout(timeout))?
                .map_err(EtcdError::from)
        })?;
        Ok(Self {
            rt,
            client,
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// The full key of `rel`.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn run<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let fut = f(self.client.clone());
        self.rt.block_on(async {
            tokio::time::timeout(self.timeout, fut)
                .await
                .map_err(|_| EtcdError::Timeout(self.timeout))?
                .map_err(EtcdError::from)
        })
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Kv {
        let key = String::from_utf8_lossy(kv.key());
        Kv {
            key: key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }

    /// Every key under `rel`.
    pub fn list(&self, rel: &str) -> Result<Vec<Kv>, EtcdError> {
        let key = self.key(rel);
        let resp = self
            .run(|mut c| async move { c.get(key, Some(GetOptions::new().with_prefix())).await })?;
        Ok(resp.kvs().iter().map(|kv| self.kv(kv)).collect())
    }

    /// One key.
    pub fn get(&self, rel: &str) -> Result<Option<Kv>, EtcdError> {
        let key = self.key(rel);
        let resp = self.run(|mut c| async move { c.get(key, None).await })?;
        Ok(resp.kvs().first().map(|kv| self.kv(kv)))
    }

    /// Sets a key (attached to `lease` if given); the revision it made.
    pub fn put(&self, rel: &str, value: Vec<u8>, lease: Option<i64>) -> Result<i64, EtcdError> {
        let key = self.key(rel);
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self.run(|mut c| async move { c.put(key, value, opts).await })?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Deletes a key; whether it was there.
    pub fn delete(&self, rel: &str) -> Result<bool, EtcdError> {
        let key = self.key(rel);
        let resp = self.run(|mut c| async move { c.delete(key, None).await })?;
        Ok(resp.deleted() > 0)
    }

    /// A transaction: `when` all hold, `then`, else `otherwise`. Keys in the
    /// compares and operations are relative ([`Etcd::key`] is applied by the
    /// builders in this module's callers).
    pub fn txn(
        &self,
        when: Vec<Compare>,
        then: Vec<TxnOp>,
        otherwise: Vec<TxnOp>,
    ) -> Result<TxnResponse, EtcdError> {
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        self.run(|mut c| async move { c.txn(txn).await })
    }

    /// The revision a transaction's changes made.
    pub fn revision(resp: &TxnResponse) -> i64 {
        resp.header().map_or(0, |h| h.revision())
    }

    /// The keys a transaction's `get` operations read.
    pub fn got(&self, resp: &TxnResponse) -> Vec<Kv> {
        resp.op_responses()
            .iter()
            .filter_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
                _ => None,
            })
            .flatten()
            .map(|kv| self.kv(&kv))
            .collect()
    }

    /// A new lease of `ttl`.
    pub fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self.run(|mut c| async move { c.lease_grant(secs, None).await })?;
        Ok(resp.id())
    }

    /// Refreshes `lease` once; the seconds it has left (0: it expired).
    pub fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let r = self.run(|mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |r| r.ttl()))
        });
        match r {
            // etcd forgot it: expired while this monitor was cut off (said
            // as a gRPC status or by the keep-alive stream).
            Err(EtcdError::Client(e)) if e.to_string().contains("lease not found") => Ok(0),
            other => other,
        }
    }

    /// Gives `lease` back (its keys go at once).
    pub fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.run(|mut c| async move { c.lease_revoke(lease).await.map(|_| ()) })
    }
}
