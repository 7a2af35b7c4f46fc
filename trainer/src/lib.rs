pub mod checkpoint;
pub mod export;
pub mod knn;
pub mod loaders;
pub mod metrics;
pub mod plot;
