//! S3-compatible buckets through `aws-sdk-s3`, over the SDK's hyper client on rustls with
//! aws-lc-rs.
//!
//! What is read, and from where:
//! - endpoint: [`RemoteOptions::s3_endpoint`], else `AWS_ENDPOINT_URL_S3`, else
//!   `AWS_ENDPOINT_URL` (both ignored when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`), else
//!   AWS itself;
//! - addressing: path-style when [`RemoteOptions::s3_force_path_style`] (needed by most
//!   S3-compatible servers), virtual-hosted otherwise;
//! - region: [`RemoteOptions::s3_region`], else `AWS_REGION`, else `AWS_DEFAULT_REGION`, else
//!   the profile's `region` (`AWS_PROFILE`, `AWS_CONFIG_FILE`), else `us-east-1` (the instance
//!   metadata service is never asked for the region, so building the client needs no network);
//! - credentials, resolved lazily on the first request by the SDK's default chain:
//!   `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`; the shared profile
//!   files (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`, including
//!   `credential_process`); web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`,
//!   `AWS_ROLE_SESSION_NAME`: EKS IRSA); the ECS container endpoint
//!   (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` / `_FULL_URI`); the EC2 instance metadata
//!   service (`AWS_EC2_METADATA_DISABLED=true` turns it off). SSO profiles are not supported
//!   (the SDK's `sso` feature is off).
//!
//! Checksums are computed and validated only when an operation requires them
//! (`WhenRequired`), which S3-compatible servers expect. Timeouts: connect
//! [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT), each operation (all its attempts)
//! [`RemoteOptions::request_timeout`]; the SDK's standard retry (3 attempts) stays on.

use std::fmt::Write as _;
use std::path::Path;

use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::region::ProfileFileRegionProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use super::{
    error_chain, ErrorContext, ObjectEntry, RemoteOptions, StorageError, CONNECT_TIMEOUT,
    MULTIPART_PART_SIZE,
};

/// The region when nothing names one.
const DEFAULT_REGION: &str = "us-east-1";

/// S3 allows at most this many parts in one multipart upload.
const MAXIMUM_PARTS: u64 = 10_000;

/// Parts uploaded at the same time in a multipart upload.
const PARTS_IN_FLIGHT: usize = 2;

/// One bucket and key prefix. `Debug` leaves the client out: its configuration holds the
/// credentials provider.
pub(super) struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    context: ErrorContext,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds the client. Reads the environment and profile files, never the network.
    pub(super) async fn connect(
        bucket: &str,
        prefix: &str,
        options: &RemoteOptions,
        context: ErrorContext,
    ) -> Result<Self, StorageError> {
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build_https();
        let region = RegionProviderChain::first_try(options.s3_region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::new())
            .or_else(Region::from_static(DEFAULT_REGION));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(options.request_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .region(region)
            .timeout_config(timeouts);
        if let Some(endpoint) = &options.s3_endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared_config = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared_config)
            .force_path_style(options.s3_force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            context,
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Maps an SDK error: a missing object becomes [`StorageError::NotFound`]; anything else a
    /// sanitized [`StorageError::Request`] with the whole error chain.
    fn request_error<E>(
        &self,
        operation: &'static str,
        key: &str,
        error: SdkError<E, HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = error
            .raw_response()
            .map(|response| response.status().as_u16());
        let missing_object = match error.code() {
            Some(code) => code == "NoSuchKey" || code == "NotFound",
            // HEAD answers carry no error body: a bare 404 is the object.
            None => status == Some(404) && operation == "head",
        };
        if missing_object {
            return self.context.not_found(operation, key);
        }
        // The Display chain, not `DisplayErrorContext`: that one appends the error's Debug form,
        // which holds the whole raw response.
        let mut message = String::new();
        if let Some(status) = status {
            let _ = write!(message, "HTTP {status}: ");
        }
        message.push_str(&error_chain(&error));
        match (
            error.code().filter(|code| !message.contains(code)),
            error.message(),
        ) {
            (Some(code), Some(text)) => {
                let _ = write!(message, " ({code}: {text})");
            }
            (Some(code), None) => {
                let _ = write!(message, " ({code})");
            }
            _ => {}
        }
        self.context.request(operation, key, message)
    }

    pub(super) async fn put_file(
        &self,
        key: &str,
        path: &Path,
        content_type: Option<&str>,
    ) -> Result<u64, StorageError> {
        let length = tokio::fs::metadata(path)
            .await
            .map_err(|error| self.context.local_file("put", key, path, error))?
            .len();
        if length > MULTIPART_PART_SIZE {
            return self.put_multipart(key, path, length, content_type).await;
        }
        let body = self.file_body(key, path, 0, length).await?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(content_length(length))
            .set_content_type(content_type.map(str::to_owned))
            .body(body)
            .send()
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        Ok(length)
    }

    /// A body streaming `length` bytes of the file from `offset` (re-opened when the SDK
    /// retries).
    async fn file_body(
        &self,
        key: &str,
        path: &Path,
        offset: u64,
        length: u64,
    ) -> Result<ByteStream, StorageError> {
        ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(Length::Exact(length))
            .build()
            .await
            .map_err(|error| {
                self.context
                    .local_file("put", key, path, std::io::Error::other(error))
            })
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        length: u64,
        content_type: Option<&str>,
    ) -> Result<u64, StorageError> {
        let full_key = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .set_content_type(content_type.map(str::to_owned))
            .send()
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                self.context.request(
                    "put",
                    key,
                    "CreateMultipartUpload answered without an upload id",
                )
            })?
            .to_owned();
        let part_size = part_size(length);
        tracing::debug!(
            store = %self.context.store,
            key,
            length,
            part_size,
            "multipart upload started"
        );
        let uploaded = async {
            let parts = self
                .upload_parts(key, &full_key, &upload_id, path, length, part_size)
                .await?;
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|error| self.request_error("put", key, error))
        }
        .await;
        match uploaded {
            Ok(_) => Ok(length),
            Err(error) => {
                let aborted = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full_key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                if let Err(abort_error) = aborted {
                    tracing::warn!(
                        store = %self.context.store,
                        key,
                        error = %self.request_error("put", key, abort_error),
                        "aborting a failed multipart upload failed too (the store's lifecycle rules clean it up)"
                    );
                }
                Err(error)
            }
        }
    }

    /// Uploads every part, [`PARTS_IN_FLIGHT`] at a time, each streamed from the file by offset
    /// and length. Returns the parts in order.
    async fn upload_parts(
        &self,
        key: &str,
        full_key: &str,
        upload_id: &str,
        path: &Path,
        length: u64,
        part_size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let count = length.div_ceil(part_size);
        futures_util::stream::iter(0..count)
            .map(|index| async move {
                let offset = index * part_size;
                let size = part_size.min(length - offset);
                let part_number = i32::try_from(index + 1).map_err(|_| {
                    self.context
                        .request("put", key, "too many parts for one multipart upload")
                })?;
                let body = self.file_body(key, path, offset, size).await?;
                let output = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .upload_id(upload_id)
                    .part_number(part_number)
                    .content_length(content_length(size))
                    .body(body)
                    .send()
                    .await
                    .map_err(|error| self.request_error("put", key, error))?;
                Ok(CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(output.e_tag().map(str::to_owned))
                    .build())
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await
    }

    pub(super) async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: Option<&str>,
    ) -> Result<(), StorageError> {
        let length = content_length(bytes.len() as u64);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(length)
            .set_content_type(content_type.map(str::to_owned))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|error| self.request_error("put", key, error))?;
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|error| self.request_error("get", key, error))?;
        let body = output
            .body
            .collect()
            .await
            .map_err(|error| self.context.request("get", key, error_chain(&error)))?;
        Ok(body.into_bytes())
    }

    pub(super) async fn download_to(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|error| self.request_error("get", key, error))?;
        let local_error = |error| self.context.local_file("get", key, path, error);
        let mut file = tokio::fs::File::create(path).await.map_err(local_error)?;
        let mut body = output.body;
        let mut written = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|error| self.context.request("get", key, error_chain(&error)))?
        {
            file.write_all(&chunk).await.map_err(local_error)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(local_error)?;
        Ok(written)
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, StorageError> {
        let full_prefix = self.full_key(prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .set_prefix((!full_prefix.is_empty()).then_some(full_prefix))
            .into_paginator()
            .send();
        let mut entries = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| self.request_error("list", prefix, error))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let Some(relative) = key.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                entries.push(ObjectEntry {
                    key: relative.to_owned(),
                    size: object
                        .size()
                        .and_then(|size| u64::try_from(size).ok())
                        .unwrap_or(0),
                });
            }
        }
        Ok(entries)
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => match self.request_error("delete", key, error) {
                missing if missing.is_not_found() => Ok(()),
                other => Err(other),
            },
        }
    }

    pub(super) async fn content_type(&self, key: &str) -> Result<Option<String>, StorageError> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|error| self.request_error("head", key, error))?;
        Ok(output.content_type().map(str::to_owned))
    }
}

/// A length as the SDK's `Content-Length` type (saturating: no real file reaches `i64::MAX`).
fn content_length(length: u64) -> i64 {
    i64::try_from(length).unwrap_or(i64::MAX)
}

/// The part size for a file of `length` bytes: [`MULTIPART_PART_SIZE`], or more (in whole MiB)
/// when the file needs more than [`MAXIMUM_PARTS`] parts.
fn part_size(length: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let smallest = length.div_ceil(MAXIMUM_PARTS).div_ceil(MIB) * MIB;
    smallest.max(MULTIPART_PART_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's `Debug` names the bucket, never the credentials the client holds.
    #[test]
    fn debug_prints_no_credential() {
        let secret_key = "wJalrXUtnFEMI-secret-Zq81vXk3";
        let session_token = "session-token-Lx93HbQ2";
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "AKIDEXAMPLE",
                secret_key,
                Some(session_token.to_owned()),
                None,
                "test",
            ))
            .build();
        let store = S3Store {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: "scoring-data".to_owned(),
            prefix: "my-model/".to_owned(),
            context: ErrorContext {
                store: "s3://scoring-data/my-model".to_owned(),
            },
        };
        let text = format!("{store:?} {store:#?}");
        assert!(text.contains("scoring-data"), "{text}");
        for secret in [secret_key, session_token] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn part_size_stays_at_eight_mebibytes_until_ten_thousand_parts() {
        assert_eq!(part_size(MULTIPART_PART_SIZE + 1), MULTIPART_PART_SIZE);
        assert_eq!(
            part_size(MULTIPART_PART_SIZE * MAXIMUM_PARTS),
            MULTIPART_PART_SIZE
        );
        let huge = MULTIPART_PART_SIZE * MAXIMUM_PARTS + 1;
        let size = part_size(huge);
        assert!(size > MULTIPART_PART_SIZE);
        assert!(huge.div_ceil(size) <= MAXIMUM_PARTS);
        assert_eq!(size % (1024 * 1024), 0);
    }
}
