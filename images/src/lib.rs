//! images: what hull boots: the guest kernel ([`kernel`]) and container images.

pub mod kernel;

pub use kernel::{build as build_kernel, BuiltKernel, KernelBuildOptions, KernelError};

pub mod archive;
pub mod default_image;
mod ingest;
pub mod reference;
pub mod registry;
pub mod store;
mod tarwalk;

pub use reference::{Reference, ReferenceError};
pub use registry::{login, login_with, logout};
pub use store::{
    Compression, Image, ImportOptions, Layer, PruneReport, PullOptions, Removed, Store, StoreError,
};
