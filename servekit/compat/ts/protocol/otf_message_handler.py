"""``ts.protocol.otf_message_handler``: where older handlers import ``send_intermediate_predict_response``."""

from ts.handler_utils.utils import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
