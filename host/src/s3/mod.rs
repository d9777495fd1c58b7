//! Object storage for exported snapshots: an S3 client built from the
//! configuration (standard AWS credential chain, optional S3-compatible
//! endpoint with path-style addressing) and the few calls the transfer
//! pipelines need: multipart upload, small puts, streamed gets, listing and
//! aborting of leftover uploads. Keys given to it are relative to S3_PREFIX.

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncBufRead;

/// Where exported snapshots go (from S3_BUCKET, S3_REGION, S3_PREFIX, S3_ENDPOINT).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("object {0:?} not found in the bucket")]
    NotFound(String),
    #[error("S3 request {op} failed: {detail}")]
    Request { op: &'static str, detail: String },
    #[error("S3 answered {op} without {what}")]
    Incomplete {
        op: &'static str,
        what: &'static str,
    },
}

pub type Result<T> = std::result::Result<T, S3Error>;

fn request_error<E, R>(op: &'static str) -> impl FnOnce(SdkError<E, R>) -> S3Error
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    move |err| S3Error::Request {
        op,
        detail: DisplayErrorContext(&err).to_string(),
    }
}

/// A multipart upload in progress.
#[derive(Debug, Clone)]
pub struct Upload {
    pub key: String,
    pub upload_id: String,
}

/// Handle to the bucket; cheap to clone.
#[derive(Clone)]
pub struct ObjectStore {
    client: Client,
    bucket: String,
    prefix: String,
}

impl ObjectStore {
    pub async fn connect(settings: &S3Settings) -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .load()
            .await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            // Only what S3 requires: S3-compatible servers differ on the newer
            // default checksums, and every stream carries our own SHA-256.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint).force_path_style(true);
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
        }
    }

    /// The full object key of `relative`.
    pub fn full_key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub async fn start_upload(&self, key: &str) -> Result<Upload> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/zstd")
            .send()
            .await
            .map_err(request_error("CreateMultipartUpload"))?;
        let upload_id = out.upload_id().ok_or(S3Error::Incomplete {
            op: "CreateMultipartUpload",
            what: "an upload id",
        })?;
        Ok(Upload {
            key: key.to_string(),
            upload_id: upload_id.to_string(),
        })
    }

    pub async fn upload_part(
        &self,
        upload: &Upload,
        number: i32,
        data: Bytes,
    ) -> Result<CompletedPart> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .part_number(number)
            .body(ByteStream::from(data))
            .customize()
            // The SigV4 payload hash would be a second SHA-256 pass over every
            // byte, as costly as our own. The parts are checked end to end
            // instead: the manifest (a signed PutObject) holds the SHA-256 of
            // the whole stream, which an import verifies.
            .disable_payload_signing()
            .send()
            .await
            .map_err(request_error("UploadPart"))?;
        let etag = out.e_tag().ok_or(S3Error::Incomplete {
            op: "UploadPart",
            what: "an ETag",
        })?;
        Ok(CompletedPart::builder()
            .e_tag(etag)
            .part_number(number)
            .build())
    }

    pub async fn complete_upload(&self, upload: &Upload, parts: Vec<CompletedPart>) -> Result<()> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(request_error("CompleteMultipartUpload"))?;
        Ok(())
    }

    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(request_error("AbortMultipartUpload"))?;
        Ok(())
    }

    pub async fn put(&self, key: &str, data: Vec<u8>, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(request_error("PutObject"))?;
        Ok(())
    }

    /// A whole small object (a manifest), refusing anything over `limit` bytes.
    pub async fn get_small(&self, key: &str, limit: usize) -> Result<Vec<u8>> {
        let (len, mut body) = self.get_stream(key).await?;
        if len.is_some_and(|len| len > limit as u64) {
            return Err(S3Error::Request {
                op: "GetObject",
                detail: format!("{key:?} is larger than {limit} bytes"),
            });
        }
        let mut data = Vec::new();
        let mut reader = tokio::io::AsyncReadExt::take(&mut body, limit as u64 + 1);
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut data)
            .await
            .map_err(|e| S3Error::Request {
                op: "GetObject",
                detail: e.to_string(),
            })?;
        if data.len() > limit {
            return Err(S3Error::Request {
                op: "GetObject",
                detail: format!("{key:?} is larger than {limit} bytes"),
            });
        }
        Ok(data)
    }

    /// Streams an object: its length when the server says, and its bytes.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<(Option<u64>, impl AsyncBufRead + Send + Unpin + 'static)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| {
                if err.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                    S3Error::NotFound(key.to_string())
                } else {
                    request_error("GetObject")(err)
                }
            })?;
        let len = out.content_length().and_then(|l| u64::try_from(l).ok());
        Ok((len, out.body.into_async_read()))
    }
}
