//! Azure Blob containers through `object_store` (its `azure` feature: a reqwest client on rustls
//! with aws-lc-rs).
//!
//! What is read, and from where (`object_store`'s `MicrosoftAzureBuilder::from_env` reads every
//! `AZURE_*` variable it knows; the ones that matter):
//! - account: `AZURE_STORAGE_ACCOUNT_NAME`;
//! - endpoint: [`RemoteOptions::azure_endpoint`] (the account URL, e.g.
//!   `http://127.0.0.1:10000/devstoreaccount1` for Azurite; plain `http` is allowed only for an
//!   `http://` endpoint given here), else `AZURE_STORAGE_ENDPOINT`, else
//!   `https://<account>.blob.core.windows.net`;
//! - credentials, first match wins: a bearer token `AZURE_STORAGE_TOKEN`; the account key
//!   `AZURE_STORAGE_ACCOUNT_KEY` (alias `AZURE_STORAGE_ACCESS_KEY`); workload identity
//!   (`AZURE_CLIENT_ID` + `AZURE_TENANT_ID` + `AZURE_FEDERATED_TOKEN_FILE`: AKS); a service
//!   principal (`AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET` + `AZURE_TENANT_ID`); a SAS
//!   (`AZURE_STORAGE_SAS_TOKEN` / `AZURE_STORAGE_SAS_KEY`, percent-encoded as the portal shows
//!   it, with or without the leading `?`); the Azure CLI when `AZURE_USE_AZURE_CLI=true`;
//!   otherwise managed identity through the instance metadata endpoint (`AZURE_CLIENT_ID`,
//!   `AZURE_OBJECT_ID` or `AZURE_MSI_RESOURCE_ID` pick a user-assigned identity;
//!   `IDENTITY_ENDPOINT` / `AZURE_MSI_ENDPOINT` override the endpoint).
//!   `AZURE_CREDENTIAL_TYPE` forces one kind. Connection strings are not read;
//! - Azurite: `AZURE_STORAGE_USE_EMULATOR=true` uses the emulator account `devstoreaccount1`
//!   and its well-known key unless others are set, at `AZURITE_BLOB_STORAGE_URL` (default
//!   `http://127.0.0.1:10000`) — or, when [`RemoteOptions::azure_endpoint`] is given, at that
//!   endpoint (which then includes the account: `http://127.0.0.1:PORT/devstoreaccount1`);
//! - proxies: `AZURE_PROXY_URL`, `HTTPS_PROXY`.
//!
//! Timeouts: connect [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT), each request
//! [`RemoteOptions::request_timeout`]; a request is retried at most twice, and never after
//! `request_timeout` has passed since it started.

use std::path::Path;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{StreamExt, TryStreamExt};
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientConfigKey, GetOptions, MultipartUpload,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    error_chain, ErrorContext, ObjectEntry, RemoteOptions, StorageError, CONNECT_TIMEOUT,
    MULTIPART_PART_SIZE,
};

/// Azurite's account.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";

/// Azurite's well-known account key (public, the same in every installation).
const EMULATOR_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Retries of one request after its first attempt.
const MAXIMUM_RETRIES: usize = 2;

/// Blocks staged at the same time in a multipart upload.
const PARTS_IN_FLIGHT: usize = 2;

/// One container and key prefix.
pub(super) struct AzureStore {
    store: MicrosoftAzure,
    prefix: String,
    context: ErrorContext,
}

/// Names the account and container only: object_store's own `Debug` of the client would print
/// its credential (an account key's bytes, a SAS token's query pairs).
impl std::fmt::Debug for AzureStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AzureStore")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl AzureStore {
    /// Builds the client from the environment and `options`. Needs no network: tokens are
    /// fetched on the first request.
    pub(super) fn connect(
        container: &str,
        prefix: &str,
        options: &RemoteOptions,
        context: ErrorContext,
    ) -> Result<Self, StorageError> {
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: MAXIMUM_RETRIES,
                retry_timeout: options.request_timeout,
            })
            .with_config(
                AzureConfigKey::Client(ClientConfigKey::Timeout),
                duration_text(options.request_timeout),
            )
            .with_config(
                AzureConfigKey::Client(ClientConfigKey::ConnectTimeout),
                duration_text(CONNECT_TIMEOUT),
            );
        // The AKS workload identity webhook sets AZURE_AUTHORITY_HOST with a trailing slash;
        // object_store appends `/{tenant}/oauth2/v2.0/token`, which would give `//{tenant}`.
        if let Ok(authority) = std::env::var("AZURE_AUTHORITY_HOST") {
            builder = builder.with_authority_host(authority.trim_end_matches('/'));
        }
        if let Some(endpoint) = &options.azure_endpoint {
            // object_store's emulator mode takes its URL only from AZURITE_BLOB_STORAGE_URL:
            // with an explicit endpoint, talk to it as an account URL and supply the emulator's
            // account and key when the emulator was asked for.
            let emulator = builder
                .get_config_value(&AzureConfigKey::UseEmulator)
                .is_some_and(|value| is_true(&value));
            builder = builder
                .with_use_emulator(false)
                .with_endpoint(endpoint.clone())
                .with_allow_http(endpoint.starts_with("http://"));
            if emulator {
                if builder
                    .get_config_value(&AzureConfigKey::AccountName)
                    .is_none()
                {
                    builder = builder.with_account(EMULATOR_ACCOUNT);
                }
                let has_credential = [
                    AzureConfigKey::AccessKey,
                    AzureConfigKey::SasKey,
                    AzureConfigKey::Token,
                ]
                .iter()
                .any(|key| builder.get_config_value(key).is_some());
                if !has_credential {
                    builder = builder.with_access_key(EMULATOR_ACCOUNT_KEY);
                }
            }
        }
        let store = builder
            .build()
            .map_err(|error| context.configuration(error_chain(&error)))?;
        Ok(Self {
            store,
            prefix: prefix.to_owned(),
            context,
        })
    }

    /// The object path of `key`; keys with characters object_store would rewrite are refused
    /// rather than stored under another name.
    fn location(&self, operation: &'static str, key: &str) -> Result<ObjectPath, StorageError> {
        let full_key = format!("{}{key}", self.prefix);
        ObjectPath::parse(&full_key).map_err(|error| {
            self.context
                .request(operation, key, format!("invalid key: {error}"))
        })
    }

    /// Maps an object_store error: a missing object becomes [`StorageError::NotFound`] (a
    /// missing container does not, except on `head`, whose 404 carries no body to tell).
    fn request_error(
        &self,
        operation: &'static str,
        key: &str,
        error: object_store::Error,
    ) -> StorageError {
        let text = error_chain(&error);
        // A missing container is a 404 too: its error code (in a GET's body) or, in a batch
        // delete, its reason phrase names it; a HEAD answer carries neither.
        let missing_object = matches!(error, object_store::Error::NotFound { .. })
            && !text.contains("ContainerNotFound")
            && !text.contains("container does not exist");
        if missing_object {
            self.context.not_found(operation, key)
        } else {
            self.context.request(operation, key, text)
        }
    }

    fn attributes(content_type: Option<&str>) -> Attributes {
        let mut attributes = Attributes::new();
        if let Some(content_type) = content_type {
            attributes.insert(Attribute::ContentType, content_type.to_owned().into());
        }
        attributes
    }

    pub(super) async fn put_file(
        &self,
        key: &str,
        path: &Path,
        content_type: Option<&str>,
    ) -> Result<u64, StorageError> {
        let location = self.location("put", key)?;
        let local_error = |error: std::io::Error| self.context.local_file("put", key, path, error);
        let mut file = tokio::fs::File::open(path).await.map_err(local_error)?;
        let length = file.metadata().await.map_err(local_error)?.len();
        if length <= MULTIPART_PART_SIZE {
            let bytes = read_part(&mut file).await.map_err(local_error)?;
            let uploaded = bytes.len() as u64;
            self.put_payload(key, &location, bytes, content_type)
                .await?;
            return Ok(uploaded);
        }
        let options = PutMultipartOptions {
            attributes: Self::attributes(content_type),
            ..PutMultipartOptions::default()
        };
        let mut upload = self
            .store
            .put_multipart_opts(&location, options)
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        tracing::debug!(store = %self.context.store, key, length, "multipart upload started");
        match self
            .upload_parts(key, path, &mut file, upload.as_mut())
            .await
        {
            Ok(uploaded) => Ok(uploaded),
            Err(error) => {
                if let Err(abort_error) = upload.abort().await {
                    tracing::warn!(
                        store = %self.context.store,
                        key,
                        error = %self.request_error("put", key, abort_error),
                        "aborting a failed multipart upload failed too (uncommitted blocks expire by themselves)"
                    );
                }
                Err(error)
            }
        }
    }

    /// Reads the file in [`MULTIPART_PART_SIZE`] pieces, staging at most [`PARTS_IN_FLIGHT`]
    /// at a time, then commits them. Returns the bytes uploaded.
    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        file: &mut tokio::fs::File,
        upload: &mut dyn MultipartUpload,
    ) -> Result<u64, StorageError> {
        let mut in_flight: FuturesOrdered<object_store::UploadPart> = FuturesOrdered::new();
        let mut uploaded = 0u64;
        loop {
            if in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(staged) = in_flight.next().await {
                    staged.map_err(|error| self.request_error("put", key, error))?;
                }
            }
            let part = read_part(file)
                .await
                .map_err(|error| self.context.local_file("put", key, path, error))?;
            if part.is_empty() {
                break;
            }
            let last = (part.len() as u64) < MULTIPART_PART_SIZE;
            uploaded += part.len() as u64;
            in_flight.push_back(upload.put_part(PutPayload::from(part)));
            if last {
                break;
            }
        }
        while let Some(staged) = in_flight.next().await {
            staged.map_err(|error| self.request_error("put", key, error))?;
        }
        upload
            .complete()
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        Ok(uploaded)
    }

    async fn put_payload(
        &self,
        key: &str,
        location: &ObjectPath,
        bytes: Bytes,
        content_type: Option<&str>,
    ) -> Result<(), StorageError> {
        let options = PutOptions {
            attributes: Self::attributes(content_type),
            ..PutOptions::default()
        };
        self.store
            .put_opts(location, PutPayload::from(bytes), options)
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        Ok(())
    }

    pub(super) async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: Option<&str>,
    ) -> Result<(), StorageError> {
        let location = self.location("put", key)?;
        self.put_payload(key, &location, bytes, content_type).await
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let location = self.location("get", key)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(|error| self.request_error("get", key, error))?;
        result
            .bytes()
            .await
            .map_err(|error| self.request_error("get", key, error))
    }

    pub(super) async fn download_to(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let location = self.location("get", key)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(|error| self.request_error("get", key, error))?;
        let local_error = |error: std::io::Error| self.context.local_file("get", key, path, error);
        let mut file = tokio::fs::File::create(path).await.map_err(local_error)?;
        let mut body = result.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|error| self.request_error("get", key, error))?
        {
            file.write_all(&chunk).await.map_err(local_error)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(local_error)?;
        Ok(written)
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, StorageError> {
        // object_store lists whole path segments: list the directory holding the prefix and
        // keep the keys that start with it.
        let full_prefix = format!("{}{prefix}", self.prefix);
        let directory = match full_prefix.rfind('/') {
            Some(end) if end > 0 => {
                Some(ObjectPath::parse(&full_prefix[..end]).map_err(|error| {
                    self.context
                        .request("list", prefix, format!("invalid prefix: {error}"))
                })?)
            }
            _ => None,
        };
        let mut listing = self.store.list(directory.as_ref());
        let mut entries = Vec::new();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|error| self.request_error("list", prefix, error))?
        {
            let name: &str = meta.location.as_ref();
            if !name.starts_with(full_prefix.as_str()) {
                continue;
            }
            let Some(relative) = name.strip_prefix(self.prefix.as_str()) else {
                continue;
            };
            entries.push(ObjectEntry {
                key: relative.to_owned(),
                size: meta.size,
            });
        }
        Ok(entries)
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let location = self.location("delete", key)?;
        match self.store.delete(&location).await {
            Ok(()) => Ok(()),
            Err(error) => match self.request_error("delete", key, error) {
                missing if missing.is_not_found() => Ok(()),
                other => Err(other),
            },
        }
    }

    pub(super) async fn content_type(&self, key: &str) -> Result<Option<String>, StorageError> {
        let location = self.location("head", key)?;
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&location, options)
            .await
            .map_err(|error| self.request_error("head", key, error))?;
        Ok(result
            .attributes
            .get(&Attribute::ContentType)
            .map(|value| value.to_string()))
    }
}

/// Reads up to [`MULTIPART_PART_SIZE`] bytes (fewer only at the end of the file).
async fn read_part(file: &mut tokio::fs::File) -> std::io::Result<Bytes> {
    let mut buffer = Vec::with_capacity(MULTIPART_PART_SIZE as usize);
    file.take(MULTIPART_PART_SIZE)
        .read_to_end(&mut buffer)
        .await?;
    Ok(Bytes::from(buffer))
}

/// A duration as object_store's configuration parses it (humantime).
fn duration_text(duration: std::time::Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// object_store's reading of boolean configuration values.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's `Debug` shows where it writes, never how it signs in, whatever the
    /// credential: an account key, a SAS token, a service principal's secret, a bearer token.
    #[test]
    fn debug_prints_no_credential() {
        // "secret-account-key-bytes" in base64.
        let key = "c2VjcmV0LWFjY291bnQta2V5LWJ5dGVz";
        let sas_signature = "sasSignatureQx7Vb2Mk5";
        let client_secret = "client-secret-Hn4T7wq0";
        let bearer = "bearer-token-Pm2Ks9dE";
        let base = || {
            MicrosoftAzureBuilder::new()
                .with_account("scoretapaccount")
                .with_container_name("scoring-data")
        };
        let builders = [
            ("account key", base().with_access_key(key)),
            (
                "SAS",
                base().with_sas_authorization(vec![
                    ("sv".to_owned(), "2022-11-02".to_owned()),
                    ("sig".to_owned(), sas_signature.to_owned()),
                ]),
            ),
            (
                "client secret",
                base().with_client_secret_authorization("client-id", client_secret, "tenant-id"),
            ),
            (
                "bearer token",
                base().with_bearer_token_authorization(bearer),
            ),
        ];
        for (credential, builder) in builders {
            let store = AzureStore {
                store: builder.build().expect("a client needs no network"),
                prefix: "my-model".to_owned(),
                context: ErrorContext {
                    store: "az://scoring-data/my-model".to_owned(),
                },
            };
            let text = format!("{store:?} {store:#?}");
            assert!(text.contains("scoring-data"), "{credential}: {text}");
            for secret in [key, sas_signature, client_secret, bearer] {
                assert!(!text.contains(secret), "{credential}: {text}");
            }
            assert!(
                !text.to_ascii_lowercase().contains("key"),
                "{credential}: {text}"
            );
            // The key's bytes, as object_store's own Debug would list them.
            assert!(!text.contains("115, 101, 99"), "{credential}: {text}");
        }
    }
}
