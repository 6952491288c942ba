# Imported before any stage module (python -m stages.sft): Ctrl-C during the stage's own imports is one line, not
# a traceback.
from pipeline.run import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()
