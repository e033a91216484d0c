//! `uniffi-bindgen` for this workspace, in library mode:
//! `cargo run -p matformer-bindgen -- generate --library <libmatformer_ffi.so> --language kotlin --out-dir <dir>`.
//! A binary of our own (rather than `cargo install uniffi-bindgen`) pins the generator to the
//! uniffi version the FFI crate is built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
