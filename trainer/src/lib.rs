pub mod checkpoint;
pub mod knn;
pub mod loaders;
pub mod metrics;
