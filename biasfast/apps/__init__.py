"""The command line (`biasfast run | compare | hierarchy | debias | bias-score | info`). The top layer: nothing in
the library imports it."""
