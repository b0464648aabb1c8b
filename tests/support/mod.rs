#![allow(dead_code)]
pub mod keys;
