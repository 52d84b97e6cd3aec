"""``python -m metaquant``: the same as the ``metaquant`` command."""

from metaquant_launcher import main

main()
