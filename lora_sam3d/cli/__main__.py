"""``python -m lora_sam3d.cli``: the `lora-sam3d` command."""

import sys

from lora_sam3d.cli.command import main

sys.exit(main())
