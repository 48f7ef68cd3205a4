#!/usr/bin/env bash
# placeholder until the transformers 5.x integration lands (issue 7)
echo "test_tf5: not yet written"; exit 0
