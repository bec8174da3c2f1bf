"""MMLU: a multiple-choice task that also reports the four subject groups together as "Overall"."""
from evaluation import MultiChoiceTask


class MMLU(MultiChoiceTask):
    def report_overall_metrics(self, result_dict_all):
        if result_dict_all:
            self.report_group_metrics("Overall", result_dict_all, level=0)

    def overall_metrics(self, result_dict_all):
        return self.calc_group_metrics(result_dict_all) if result_dict_all else None
