"""AWS integration: the drop-in Lambda for the DMS -> Kinesis -> Lambda architecture.

Configure the function's handler as ``optsync.aws.lambda_handler`` (see docs/lambda.md);
``optsync lambda package`` builds its deployment zip.
"""

from optsync.aws.lambda_handler import lambda_handler

__all__ = ("lambda_handler",)
