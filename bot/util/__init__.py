"""Small helpers every stage uses: installed assets, atomic files and locks, text rules."""
