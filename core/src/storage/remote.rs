//! Remote object stores (placeholder: being written).
