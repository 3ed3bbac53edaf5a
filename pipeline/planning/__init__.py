"""Planning: config loading and overrides, the run plan (shapes through the stack), capacity and memory estimates."""
