// Filled in by the key-generation helpers (merged from the JWT work).
