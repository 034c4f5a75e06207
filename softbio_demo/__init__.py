"""The demo's parts that a Space needs beside app.py: the model and its cache (models), upload ownership
(uploads), the analyses (analysis) and what the page shows (render). app.py holds only the arguments, the page's
layout and the launch. Not part of the installed package (softbio_hf is the library): it ships with app.py."""
