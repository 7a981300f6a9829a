//! The store clients configured by environment variables alone (no endpoint option): Azurite
//! through `AZURE_STORAGE_USE_EMULATOR` + `AZURITE_BLOB_STORAGE_URL`, Azurite's default account
//! and key filled in for an explicit endpoint, and moto through `AWS_ENDPOINT_URL_S3`.
//!
//! This binary holds a single test because it changes the process environment, which every
//! store client reads when it is built.

use bytes::Bytes;
use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::remote::{RemoteOptions, RemoteStore};
use scoretap_tests::stores::{Azurite, MotoServer};

async fn round_trip(store: &RemoteStore, what: &str) {
    store
        .put_bytes(
            "environment/probe",
            Bytes::from_static(b"probe"),
            Some("text/plain"),
        )
        .await
        .unwrap_or_else(|error| panic!("{what}: put: {error}"));
    assert_eq!(
        store
            .get("environment/probe")
            .await
            .unwrap_or_else(|error| panic!("{what}: get: {error}"))
            .as_ref(),
        b"probe",
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_clients_configured_by_the_environment() {
    if let Some(azurite) = Azurite::start_or_skip().await {
        azurite.create_container("environment").await;
        let location = StoreLocation::Azure {
            container: "environment".into(),
            prefix: String::new(),
        };
        // What `Azurite::env` gives a spawned scoretap: the emulator switch and its URL.
        for (name, value) in azurite.env() {
            std::env::set_var(name, value);
        }
        let store = RemoteStore::connect(&location, &RemoteOptions::default())
            .await
            .expect("connect to the emulator from the environment");
        round_trip(
            &store,
            "AZURE_STORAGE_USE_EMULATOR + AZURITE_BLOB_STORAGE_URL",
        )
        .await;

        // An explicit endpoint with the emulator switch: the emulator's account and well-known
        // key are filled in when the environment names none.
        std::env::remove_var("AZURE_STORAGE_ACCOUNT_NAME");
        std::env::remove_var("AZURE_STORAGE_ACCOUNT_KEY");
        std::env::remove_var("AZURITE_BLOB_STORAGE_URL");
        let store = RemoteStore::connect(&location, &azurite.remote_options())
            .await
            .expect("connect to the emulator's endpoint");
        round_trip(&store, "azure_endpoint + AZURE_STORAGE_USE_EMULATOR").await;

        // Without the switch, an account is required: an error at connect, not a panic.
        std::env::remove_var("AZURE_STORAGE_USE_EMULATOR");
        let error = RemoteStore::connect(&location, &azurite.remote_options())
            .await
            .expect_err("no account");
        assert_eq!(error.operation(), "connect");
        eprintln!("no account: {error}");
    }

    if let Some(moto) = MotoServer::start_or_skip().await {
        moto.create_bucket("environment").await;
        std::env::set_var("AWS_ENDPOINT_URL_S3", moto.endpoint());
        let options = RemoteOptions {
            s3_force_path_style: true,
            ..RemoteOptions::default()
        };
        let store = RemoteStore::connect(
            &StoreLocation::S3 {
                bucket: "environment".into(),
                prefix: "p/".into(),
            },
            &options,
        )
        .await
        .expect("connect to moto from the environment");
        round_trip(&store, "AWS_ENDPOINT_URL_S3").await;
        std::env::remove_var("AWS_ENDPOINT_URL_S3");
    }
}
